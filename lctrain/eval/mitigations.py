"""Training-free state-collapse mitigations as composable specs (no torch import: recipes validate them).

A spec is `none` or comma-separated `knob=value` terms, applied together at inference through the
recurrent mixers' `InferenceKnobs` (lctrain/models/recurrent.py):

- `decay_scale=s`      multiply every log-decay by s (s > 1 forgets faster; Mamba-2: A dt; GLA: the gate)
- `state_norm=c|auto`  cap each head's state at Frobenius norm c after every token; `auto` = the largest
                       per-head state norm the unmitigated model reaches within its training length
                       (so the cap never binds inside the training length)
- `state_window=W`     sliding window via state difference: the output reads the state of the last W tokens

e.g. `decay_scale=1.5,state_window=512`. `state_norm` and `state_window` do not compose (the window
subtracts states, the cap is nonlinear); that is rejected here with a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from lctrain.schema import ConfigError

KNOBS = ("decay_scale", "state_norm", "state_window")


@dataclass(frozen=True)
class Mitigation:
    name: str                                   # the canonical spec, e.g. "decay_scale=2,state_window=64"
    decay_scale: float = 1.0
    state_norm: Union[None, float, str] = None  # a number, or "auto" (resolved by the length study)
    state_window: Optional[int] = None

    @property
    def neutral(self) -> bool:
        return self.decay_scale == 1.0 and self.state_norm is None and self.state_window is None

    def knobs(self, auto_norm: Optional[float] = None):
        """The `InferenceKnobs` (`auto_norm` resolves state_norm=auto)."""
        from lctrain.models import InferenceKnobs
        norm = self.state_norm
        if norm == "auto":
            if auto_norm is None:
                raise ValueError(f"mitigation {self.name}: state_norm=auto needs the unmitigated state norms "
                                 "(run by the length study)")
            norm = float(auto_norm)
        return InferenceKnobs(decay_scale=self.decay_scale, state_norm=norm, state_window=self.state_window)


def parse_mitigation(spec: str, path: str = "--mitigation") -> Mitigation:
    """Parse a spec (see module doc); raises ConfigError naming `path` with one line."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(path, f"expected a mitigation spec like 'none' or 'decay_scale=2', got {spec!r}")
    text = spec.strip().replace(" ", "")
    if text == "none":
        return Mitigation("none")
    vals: dict = {}
    for term in text.split(","):
        if "=" not in term:
            raise ConfigError(path, f"bad term {term!r} in {spec!r}: expected knob=value with knob one of "
                                    f"{', '.join(KNOBS)} (or the spec 'none')")
        k, v = term.split("=", 1)
        if k not in KNOBS:
            raise ConfigError(path, f"unknown knob {k!r} in {spec!r}; known: {', '.join(KNOBS)}")
        if k in vals:
            raise ConfigError(path, f"knob {k!r} given twice in {spec!r}")
        try:
            if k == "decay_scale":
                x = float(v)
                if not x > 0:
                    raise ValueError
            elif k == "state_norm":
                x = "auto" if v == "auto" else float(v)
                if x != "auto" and not x > 0:
                    raise ValueError
            else:
                x = int(v)
                if x < 1:
                    raise ValueError
        except ValueError:
            want = {"decay_scale": "a positive number", "state_norm": "a positive number or auto",
                    "state_window": "a positive integer"}[k]
            raise ConfigError(path, f"{k} must be {want}, got {v!r}") from None
        vals[k] = x
    if "state_norm" in vals and "state_window" in vals:
        raise ConfigError(path, f"{spec!r}: state_norm and state_window cannot be combined "
                                "(the window subtracts states; the cap is nonlinear)")
    m = Mitigation("", **vals)
    name = ",".join(f"{k}={_fmt(getattr(m, k))}" for k in KNOBS if k in vals)
    return Mitigation(name, **vals)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)
