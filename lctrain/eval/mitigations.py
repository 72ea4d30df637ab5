"""Training-free state-collapse mitigations as composable specs (no torch import: recipes validate them).

A spec is `none` or comma-separated `knob=value` terms, applied together at inference through the
recurrent mixers' `InferenceKnobs` (lctrain/models/recurrent.py):

- `decay_scale=s`      multiply every log-decay by s (s > 1 forgets faster; Mamba-2: A dt; GLA: the gate)
- `state_norm=c`       cap each head's state at Frobenius norm c after every token
- `state_window=W`     sliding window via state difference: the output reads the state of the last W tokens

Each knob also takes `auto` or `auto*x` (x: the strength), resolved per run and per head from the run's
training length L and its unmitigated pass on the same probe (`AutoContext`):

- `state_norm=auto*x`  per head: x times the largest norm *that head* reaches within L (x = 1: the cap
                       never binds inside the training length; smaller x is stronger)
- `state_window=auto*x` W = round(x L) (x = 1: exactly the context the run was trained on)
- `decay_scale=auto*x` per head: s_h = max(1, x m_h / L), m_h = 1 / -mean(g_h) the head's memory length
                       in tokens (x = 1: no head remembers longer than L; larger x is stronger)

e.g. `decay_scale=1.5,state_window=512`. `state_norm` and `state_window` do not compose (the window
subtracts states, the cap is nonlinear); that is rejected here with a one-line error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from lctrain.schema import ConfigError

KNOBS = ("decay_scale", "state_norm", "state_window")


def auto_strength(value) -> Optional[float]:
    """x of an `auto*x` value (1.0 for `auto`), None for a number or None."""
    if isinstance(value, str) and value.startswith("auto"):
        return float(value[5:]) if value.startswith("auto*") else 1.0
    return None


@dataclass
class AutoContext:
    """What `auto` values resolve against: the run's training length and, per recurrent state
    (layer, key), each head's largest norm within it and memory length (from the unmitigated pass)."""
    train_len: int
    head_norms: dict = field(default_factory=dict)     # (layer, key) -> [H] floats
    head_memory: dict = field(default_factory=dict)    # (layer, key) -> [H] tokens (inf: no decay)


@dataclass(frozen=True)
class Mitigation:
    name: str                                   # the canonical spec, e.g. "decay_scale=2,state_window=64"
    decay_scale: Union[float, str] = 1.0        # a number or "auto" / "auto*x"
    state_norm: Union[None, float, str] = None
    state_window: Union[None, int, str] = None

    @property
    def neutral(self) -> bool:
        return self.decay_scale == 1.0 and self.state_norm is None and self.state_window is None

    @property
    def needs_auto(self) -> bool:
        return any(auto_strength(getattr(self, k)) is not None for k in KNOBS)

    def knob(self) -> Optional[str]:
        """The one knob this spec turns (None if it turns several or none): the sweep plot's series."""
        on = [k for k in KNOBS if getattr(self, k) not in (None, 1.0)]
        return on[0] if len(on) == 1 else None

    def strength(self, auto: Optional[AutoContext] = None) -> Optional[float]:
        """The sweep plot's x value for a one-knob spec: the number, or the resolved window / auto factor."""
        k = self.knob()
        if k is None:
            return None
        v = getattr(self, k)
        x = auto_strength(v)
        if x is None:
            return float(v)
        return float(round(x * auto.train_len)) if k == "state_window" and auto else x

    def knobs(self, auto: Optional[AutoContext] = None):
        """The `InferenceKnobs`, with `auto` values resolved against `auto` (required if any)."""
        from lctrain.models import InferenceKnobs
        if self.needs_auto and auto is None:
            raise ValueError(f"mitigation {self.name}: auto values need the run's training length and "
                             "unmitigated state norms (resolved by the length study)")
        heads: dict = {}
        ds, norm, win = self.decay_scale, self.state_norm, self.state_window
        x = auto_strength(ds)
        if x is not None:
            for lk, mem in auto.head_memory.items():
                heads.setdefault(lk, {})["decay_scale"] = [max(1.0, x * m / auto.train_len) if math.isfinite(m)
                                                           else 1.0 for m in mem]
            ds = 1.0
        x = auto_strength(norm)
        if x is not None:
            if not auto.head_norms:
                raise ValueError(f"mitigation {self.name}: the model has no recurrent state to normalise")
            for lk, nrm in auto.head_norms.items():
                heads.setdefault(lk, {})["state_norm"] = [x * n if n and n > 0 else math.inf for n in nrm]
            norm = None
        x = auto_strength(win)
        if x is not None:
            win = max(1, int(round(x * auto.train_len)))
        return InferenceKnobs(decay_scale=float(ds), state_norm=None if norm is None else float(norm),
                              state_window=win, heads=heads or None)


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
            if v == "auto" or v.startswith("auto*"):
                f = float(v[5:]) if v != "auto" else 1.0
                if not (f > 0 and math.isfinite(f)):
                    raise ValueError
                x = "auto" if f == 1.0 else f"auto*{f:g}"
            elif k == "state_window":
                from lctrain.eval.sizes import parse_size
                x = parse_size(v, path)
            else:
                x = float(v)
                if not (x > 0 and math.isfinite(x)):
                    raise ValueError
        except (ValueError, ConfigError):
            want = {"decay_scale": "a positive number", "state_norm": "a positive number",
                    "state_window": "a positive integer (1k = 1024)"}[k]
            raise ConfigError(path, f"{k} must be {want}, auto or auto*x (x > 0), got {v!r}") from None
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
