"""PNG plots of the evaluations (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_") or "x"


def _finish(fig, ax, path: str, title: str, legend_size: int = 8) -> str:
    """The common tail of a one-axes figure: grid, legend, title, then `_save`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _mark_train_len(ax, train_len, label=True, color="k", text="training length"):
    if train_len:
        ax.axvline(train_len, color=color, ls="--", lw=1, label=f"{text} ({train_len})" if label else None)


def passkey_heatmap(result: dict, path: str, title: str = "", train_len: Optional[int] = None,
                    train_label: str = "training length") -> str:
    """Accuracy heatmap: needle depth (rows) x context length (columns), cell values annotated; the
    training length is starred (a listed length) or a dashed line (between columns)."""
    plt = _plt()
    acc = np.asarray(result["accuracy"], dtype=float)
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.55 * len(depths)))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([f"{n}{'*' if train_len and n == train_len else ''}" for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:g}" for d in depths])
    if train_len in lengths:
        note = f"; * = {train_label}"
    elif train_len and lengths[0] < train_len < lengths[-1]:
        note = f"; dashed = {train_label} ({train_len})"
    elif train_len:
        note = f"; {train_label} {train_len}"
    else:
        note = ""
    ax.set_xlabel("context length (tokens)" + note)
    ax.set_ylabel("needle depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    if train_len and train_len not in lengths and lengths[0] < train_len < lengths[-1]:
        x = float(np.interp(np.log(train_len), np.log(lengths), np.arange(len(lengths))))
        ax.axvline(x, color="k", ls="--", lw=1)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"passkey retrieval (overall {result['overall']:.2f})", fontsize=10)
    return _save(fig, path)


def loss_vs_position(curves: dict[str, tuple[Sequence[float], Sequence[Optional[float]]]], path: str,
                     train_lens: Sequence[int] = (), title: str = "") -> str:
    """Per-position loss: one line per curve name -> (positions, losses); training length(s) marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (x, y) in curves.items():
        y = np.array([np.nan if v is None else v for v in y], dtype=float)
        ax.plot(x, y, marker="o", ms=3, lw=1.4, label=name)
    for i, tl in enumerate(sorted(set(t for t in train_lens if t))):
        _mark_train_len(ax, tl, color=f"C{7 + i % 3}" if len(train_lens) > 1 else "k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens, log scale)")
    ax.set_ylabel("loss (nats / token)")
    return _finish(fig, ax, path, title or "per-position loss")


def state_vs_position(positions: Sequence[int], layers: list[dict], path: str, stat: str = "norm",
                      train_len: Optional[int] = None, title: str = "") -> str:
    """One panel per recurrent layer, one line per head: `stat` of the state vs position (log-log)."""
    plt = _plt()
    n = max(1, len(layers))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for a in axes.flat[n:]:
        a.axis("off")
    for ax, layer in zip(axes.flat, layers):
        vals = np.asarray(layer[stat], dtype=float)            # [positions, heads]
        for h in range(vals.shape[1]):
            ax.plot(positions, vals[:, h], lw=1, label=f"h{h}" if vals.shape[1] <= 8 else None)
        _mark_train_len(ax, train_len, label=False)
        ax.set_xscale("log", base=2)
        if stat in ("norm", "max", "var") and np.all(vals[np.isfinite(vals)] > 0):
            ax.set_yscale("log")
        ax.set_title(f"layer {layer['layer']} ({layer['key']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if vals.shape[1] <= 8 and ax is axes.flat[0]:
            ax.legend(fontsize=6, ncol=2, loc="best")
    fig.supxlabel("position (tokens)" + (f"; dashed = training length {train_len}" if train_len else ""),
                  fontsize=9)
    fig.supylabel(f"state {stat} per head", fontsize=9)
    fig.suptitle(title or f"recurrent state {stat} vs position", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def lines(x: Sequence, series: dict[str, Sequence[float]], path: str, xlabel: str, ylabel: str,
          title: str = "", logx: bool = True, train_lens: Sequence[int] = (), ylim=None,
          train_label: str = "training length") -> str:
    """A generic line plot (study summaries, e.g. passkey accuracy vs length per state size)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, y in series.items():
        ax.plot(x, y, marker="o", ms=4, lw=1.4, label=name)
    for i, tl in enumerate(sorted(set(t for t in train_lens if t))):
        _mark_train_len(ax, tl, color=f"C{7 + i % 3}" if len(set(train_lens)) > 1 else "k", text=train_label)
    if logx:
        ax.set_xscale("log", base=2)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title)


def top_head_curves(positions: Sequence[int], heads: list[dict], path: str, train_len: Optional[int] = None,
                    title: str = "") -> str:
    """Mean / variance / max|.| of the state entries vs position for the top heads (one line per head);
    `heads`: [{"label", "mean": [...], "var": [...], "max": [...]}]."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, stat in zip(axes, ("mean", "var", "max")):
        for h in heads:
            ax.plot(positions, np.array([np.nan if v is None else v for v in h[stat]], dtype=float), lw=1.3,
                    marker="o", ms=2, label=h["label"])
        _mark_train_len(ax, train_len, label=False)
        ax.set_xscale("log", base=2)
        if stat != "mean":
            ax.set_yscale("log")
        ax.set_title({"mean": "mean entry", "var": "variance of entries", "max": "max |entry|"}[stat], fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.supxlabel("position (tokens)" + (f"; dashed = training length {train_len}" if train_len else ""), fontsize=9)
    fig.suptitle(title or "state statistics of the heads that grow most past the training length", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def entry_histogram(samples: dict[str, np.ndarray], path: str, title: str = "") -> str:
    """Histogram of state entries (one series per label, e.g. at the training length and far beyond)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    allv = np.concatenate([np.asarray(v, dtype=float).ravel() for v in samples.values()])
    lim = float(np.nanmax(np.abs(allv))) or 1.0
    bins = np.linspace(-lim, lim, 81)
    for name, v in samples.items():
        ax.hist(np.asarray(v, dtype=float).ravel(), bins=bins, alpha=0.55, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("state entry value")
    ax.set_ylabel("count")
    return _finish(fig, ax, path, title or "state entries of the top head")


def strength_sweep(series: dict[str, tuple[Sequence[float], Sequence[Optional[float]]]], path: str,
                   baseline: dict[str, Optional[float]], title: str = "", ylabel: str = "loss beyond the training length") -> str:
    """Loss vs mitigation strength: one line per (run, knob) -> (strengths, losses); the unmitigated loss
    of each run dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, [np.nan if v is None else v for v in y], marker="o", ms=4, lw=1.4, label=name, color=f"C{i % 10}")
    for j, (run, b) in enumerate(baseline.items()):
        if b is not None:
            ax.axhline(b, ls=":", lw=1, color="gray")
            ax.text(ax.get_xlim()[0], b, f" {run}: none", fontsize=7, va="bottom", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("strength (decay_scale: factor; state_window: tokens; state_norm: cap / in-training norm)")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title or "mitigation strength sweep", legend_size=7)


def recall_vs_state(points: list[dict], fit: Optional[dict], path: str, title: str = "") -> str:
    """Max recall length (with CI bars) vs state size, log-log, and the fitted power law."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.array([p["state"] for p in points], dtype=float)
    y = np.array([p["recall"] or np.nan for p in points], dtype=float)
    lo = np.array([p["ci"][0] or np.nan for p in points], dtype=float)
    hi = np.array([p["ci"][1] or np.nan for p in points], dtype=float)
    ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="o", capsize=4, label="max recall length")
    for p in points:
        ax.annotate(p["label"], (p["state"], p["recall"] or 1), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if fit:
        xs = np.geomspace(x.min(), x.max(), 50)
        ax.plot(xs, np.exp(fit["intercept"]) * xs ** fit["slope"], "--", label=f"fit: recall ∝ state^{fit['slope']:.2f}")
    ax.set_xscale("log", base=2)
    if np.isfinite(y).any():
        ax.set_yscale("log", base=2)
    else:                  # no run reaches the accuracy at any length: nothing to put on a log axis
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no run reaches the accuracy at any evaluated length", transform=ax.transAxes,
                ha="center", va="center", fontsize=9)
    ax.set_xlabel("recurrent state (elements per sequence)")
    ax.set_ylabel("max context with passkey accuracy >= 0.8 (tokens)")
    return _finish(fig, ax, path, title or "state capacity")
