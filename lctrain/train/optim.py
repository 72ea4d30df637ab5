"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules (`optim.schedule`), all after a linear warmup of `optim.warmup_steps`:
- `cosine` / `linear`: decay from lr to min_lr_ratio·lr over the remaining `train.steps`;
- `constant`: lr;
- `wsd` (warmup-stable-decay; Hu et al. 2024 "MiniCPM", Hägele et al. 2024 "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations"): lr until the last `decay_steps` steps
  (or `decay_fraction`·train.steps), then a linear, 1-sqrt or cosine decay to min_lr_ratio·lr.

Changing `train.steps` on resume: the LR of every step is a function of (step, train.steps), so the
trainer allows a new `train.steps` only when the steps already trained had the same LR under it
(`steps_change_problem`: the run so far is a prefix of the new one). With wsd in the stable phase that
holds: the run keeps the stable LR and the decay moves to the new end (the trainer keeps the
checkpoint where the decay starts, so a finished wsd run can be extended from there). With cosine /
linear after warmup, or a wsd run already decaying, the LR would jump: the trainer refuses with one
line.
"""
from __future__ import annotations

import math

import torch

from lctrain.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay for 1-D params (norms, biases), embeddings' peers marked `_no_weight_decay`."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, foreach=False)


def wsd_decay_start(total_steps: int, cfg: OptimConfig) -> int:
    """First step (0-based) of the wsd decay phase."""
    n = cfg.decay_steps or max(1, round(cfg.decay_fraction * total_steps))
    return max(cfg.warmup_steps, total_steps - n)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run: linear warmup, then
    the schedule (module docstring) down to min_lr_ratio·lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    wsd = cfg.schedule == "wsd"
    start = wsd_decay_start(total_steps, cfg) if wsd else cfg.warmup_steps
    if step < start:
        return cfg.lr
    # wsd: every one of its decay steps decays, the last one to the floor
    frac = min(1.0, (step - start + wsd) / max(1, total_steps - start))
    kind = cfg.decay_shape if cfg.schedule == "wsd" else cfg.schedule
    shape = {"cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)), "linear": lambda f: 1 - f,
             "1-sqrt": lambda f: 1 - math.sqrt(f)}[kind](frac)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def steps_change_problem(step: int, old_total: int, new_total: int, cfg: OptimConfig) -> tuple[bool, str]:
    """Resuming after `step` optimizer steps a run scheduled for `old_total` steps, now `new_total`:
    (allowed, one line). Allowed when the steps already trained had the same LR under both totals,
    i.e. the run so far is a prefix of the new run (then resuming equals training the new run
    from the start, bitwise on CPU)."""
    first = next((i for i in range(step) if lr_at(i, old_total, cfg) != lr_at(i, new_total, cfg)), None)
    if first is None:
        if cfg.schedule == "wsd":
            a = wsd_decay_start(new_total, cfg)
            return True, (f"train.steps {old_total} -> {new_total}: the wsd schedule keeps lr {cfg.lr:.3g} and "
                          f"now decays over steps {a + 1}..{new_total}")
        return True, f"train.steps {old_total} -> {new_total}: the LR of the {step} steps trained so far is unchanged"
    hint = ("extend a wsd run from a checkpoint at or before step "
            f"{wsd_decay_start(old_total, cfg)} (where its decay starts; kept by pruning)" if cfg.schedule == "wsd" else
            "use optim.schedule: wsd for a run meant to be extended")
    # quote the trained step whose LR changes most
    i = max(range(first, step), key=lambda j: abs(lr_at(j, old_total, cfg) - lr_at(j, new_total, cfg)))
    last, nxt = lr_at(step - 1, old_total, cfg), lr_at(step, new_total, cfg)
    rise = f", and the LR would rise from {last:.3g} at step {step} to {nxt:.3g}" if nxt > last else ""
    return False, (f"{old_total} -> {new_total} would change the {cfg.schedule} schedule mid-run: step {i + 1} "
                   f"trained with lr {lr_at(i, old_total, cfg):.3g}, the new schedule gives "
                   f"{lr_at(i, new_total, cfg):.3g}{rise}; keep train.steps={old_total}, or {hint}")
