"""One size syntax for every token-count flag and field of the evaluations: an integer with an optional
binary suffix, `k` = 1024 and `m` = 1024^2 (case-insensitive): `4096`, `16k`, `1m`, `1.5k` (= 1536).
Lists are comma-separated: `256,512,1k`."""
from __future__ import annotations

from typing import Optional, Union

from lctrain.schema import ConfigError

_MULT = {"k": 1024, "m": 1024 ** 2}


def parse_size(text: Union[str, int], flag: str, minimum: int = 1) -> int:
    """Tokens as an int; ConfigError naming `flag` (one line) unless a whole number >= `minimum`."""
    if isinstance(text, int) and not isinstance(text, bool):
        v = text
    else:
        s = str(text).strip().lower().replace("_", "")
        mult = _MULT.get(s[-1:], 1)
        num = s[:-1] if mult > 1 else s
        try:
            x = float(num) * mult if mult > 1 else int(num)
        except ValueError:
            raise ConfigError(flag, f"expected a token count like 4096, 16k or 1m (k = 1024, m = 1024^2), "
                                    f"got {text!r}") from None
        if x != int(x):
            raise ConfigError(flag, f"{text!r} is not a whole number of tokens")
        v = int(x)
    if v < minimum:
        raise ConfigError(flag, f"must be >= {minimum}, got {v}")
    return v


def parse_sizes(text: Optional[str], flag: str) -> Optional[list[int]]:
    """Comma-separated sizes (None passes through)."""
    if text is None:
        return None
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if not parts:
        raise ConfigError(flag, "is empty")
    return [parse_size(p, flag) for p in parts]


def format_size(n: int) -> str:
    """16384 -> '16k', 1048576 -> '1m', 1000 -> '1000'."""
    for suffix, m in (("m", 1024 ** 2), ("k", 1024)):
        if n >= m and n % m == 0:
            return f"{n // m}{suffix}"
    return str(n)
