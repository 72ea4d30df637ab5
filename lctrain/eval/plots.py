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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "per-position loss", fontsize=10)
    return _save(fig, path)


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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
