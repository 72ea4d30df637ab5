"""`lctrain eval length`: the state-collapse (length-extrapolation) study of one model.

Input text: a probe (lctrain/eval/probes.py: `heldout`, `documents`, `newlines`, `repeat`, `file:PATH`);
`length.source` (concat / document) is the legacy name of heldout / documents.

Per position t (the index of the predicted token, 1..T-1) the next-token loss is accumulated into
log-spaced buckets (with extra edges at the warm-up position and the training length, so "within" =
[warmup, L) and "beyond" = [L, T) are exact), per sample (bootstrap units for confidence intervals).
The recurrent state of every linear layer is read at the bucket edges (state after that many tokens) and
reduced per head to norm / mean / variance / max|.| (the effective state, see inference.py), averaged over
samples (max: maximum). The unmitigated pass also records each head's mean log-decay (memory length)
and the states of the first sample at L and at T (the histogram of the top head). Every mitigation
spec (mitigations.py) is one more pass over the same samples with the knobs set; `auto` values are
resolved per run and per head from the unmitigated pass.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lctrain.config import LengthEvalConfig, Recipe
from lctrain.eval.inference import (STAT_NAMES, bucket_index, current_rss_bytes, head_stats, layer_states,
                                    log_edges, peak_rss_bytes, recurrent_layers, stream)
from lctrain.eval.mitigations import AutoContext, parse_mitigation
from lctrain.eval.probes import build_probe, default_probe, parse_probe
from lctrain.eval.progress import Progress
from lctrain.models import LanguageModel


def probe_specs(cfg: LengthEvalConfig, text_files: Optional[Sequence[str]] = None) -> list[str]:
    """The probes to evaluate: `--text FILE...` (one file probe), else cfg.probes, else cfg.source's."""
    if text_files:
        return [f"file:{','.join(text_files)}"]
    return list(cfg.probes) or [default_probe(cfg.source)]


def build_samples(recipe: Recipe, tokenizer, cfg: LengthEvalConfig, probe: Optional[str] = None
                  ) -> tuple[list[np.ndarray], dict]:
    """The samples of one probe (default: the first of `probe_specs(cfg)`) and their description."""
    pr = parse_probe(probe or probe_specs(cfg)[0])
    samples, info = build_probe(pr, recipe, tokenizer, cfg.length, pr.samples or cfg.samples, cfg.seed)
    info["source"] = pr.name
    return samples, info


# --- one pass -------------------------------------------------------------------------------------

class _Accumulator:
    """Bucketed loss sums per sample and per-head state statistics at recording positions."""

    def __init__(self, edges: list[int], rec_pos: list[int], states: list[tuple[int, str, int]], n_samples: int,
                 snap_pos: Sequence[int] = ()):
        self.edges = edges
        self.nb = len(edges) - 1
        self.bucket = bucket_index(edges)
        self.loss = torch.zeros(n_samples, self.nb, dtype=torch.float64)
        self.count = torch.zeros(n_samples, self.nb, dtype=torch.float64)
        self.rec_pos = rec_pos
        self.rec_index = {p: i for i, p in enumerate(rec_pos)}
        self.states = states
        self.stat_sum = {(l, k): {s: np.zeros((len(rec_pos), h)) for s in STAT_NAMES} for l, k, h in states}
        self.norm_peak = {(l, k): np.zeros((len(rec_pos), h)) for l, k, h in states}
        self.stat_n = {(l, k): np.zeros(len(rec_pos)) for l, k, h in states}
        self.decay_sum = {(l, k): np.zeros(h) for l, k, h in states}
        self.decay_n = {(l, k): 0 for l, k, h in states}
        self.snap_pos = set(snap_pos)
        self.snapshots: dict[int, dict] = {}            # position -> {(layer, key): [H, K, V] of sample 0}
        self.nonfinite = 0

    def add_losses(self, pos: torch.Tensor, nll: torch.Tensor, sample: torch.Tensor):
        ok = torch.isfinite(nll)
        self.nonfinite += int((~ok).sum())
        flat = sample[ok] * self.nb + self.bucket(pos[ok])
        n = self.loss.numel()
        self.loss += torch.bincount(flat, weights=nll[ok].double(), minlength=n).view_as(self.loss)
        self.count += torch.bincount(flat, minlength=n).double().view_as(self.count)

    def add_states(self, pos: int, model, cache, rows: int, first_sample: int):
        i = self.rec_index.get(pos)
        if i is None:
            return
        for layer, key, S in layer_states(model, cache):
            st = head_stats(S[:rows])
            acc = self.stat_sum[(layer, key)]
            for name in STAT_NAMES:
                v = st[name].double().cpu().numpy()          # [rows, H]
                if name == "max":
                    acc[name][i] = np.maximum(acc[name][i], v.max(0))
                else:
                    acc[name][i] += v.sum(0)
            self.norm_peak[(layer, key)][i] = np.maximum(self.norm_peak[(layer, key)][i],
                                                         st["norm"].double().cpu().numpy().max(0))
            self.stat_n[(layer, key)][i] += rows
            if first_sample == 0 and pos in self.snap_pos:
                self.snapshots.setdefault(pos, {})[(layer, key)] = S[0].float().cpu().numpy()

    def add_decay(self, cache):
        for (layer, key) in self.decay_sum:
            rec = cache.layers[layer].get(key + ".decay")
            if rec and rec["tokens"]:
                self.decay_sum[(layer, key)] += np.asarray(rec["sum"].cpu(), dtype=np.float64)
                self.decay_n[(layer, key)] += rec["tokens"]

    def result(self) -> dict:
        tot_l, tot_c = self.loss.sum(0), self.count.sum(0)
        loss = [float(tot_l[i] / tot_c[i]) if tot_c[i] > 0 else None for i in range(self.nb)]
        layers = []
        for layer, key, h in self.states:
            n = np.maximum(self.stat_n[(layer, key)], 1)[:, None]
            acc = self.stat_sum[(layer, key)]
            entry = {"layer": layer, "key": key, "heads": h}
            for name in STAT_NAMES:
                v = acc[name] if name == "max" else acc[name] / n
                entry[name] = [[_num(x) for x in row] for row in v]
            entry["norm_peak"] = [[_num(x) for x in row] for row in self.norm_peak[(layer, key)]]
            if self.decay_n[(layer, key)]:
                mg = self.decay_sum[(layer, key)] / self.decay_n[(layer, key)]
                entry["mean_log_decay"] = [_num(x) for x in mg]
                entry["memory_tokens"] = [_num(1.0 / -x) if x < 0 else None for x in mg]    # None: no decay
            layers.append(entry)
        return {"loss": loss, "count": [int(c) for c in tot_c.tolist()],
                "loss_samples": self.loss.tolist(), "count_samples": self.count.tolist(), "state": layers,
                "nonfinite_losses": self.nonfinite}


def _num(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


@torch.no_grad()
def _run_pass(model: LanguageModel, samples: list[np.ndarray], knobs, acc: _Accumulator, chunk_size: int,
              progress: Optional[Progress] = None) -> None:
    """Samples of equal length run as one batch (in sample order); others one by one."""
    device = next(model.parameters()).device
    sizes = [s.size for s in samples]
    groups = [list(range(len(samples)))] if len(set(sizes)) == 1 else [[i] for i in range(len(samples))]
    for group in groups:
        ids = torch.from_numpy(np.stack([samples[i] for i in group]).astype(np.int64))
        T = ids.shape[1]
        sample_of_row = torch.tensor(group, dtype=torch.long)

        def on_chunk(s, e, logits, cache, ids=ids, T=T, rows=sample_of_row):
            hi = min(e, T - 1)                         # the last token predicts nothing
            if hi > s:
                lg = logits[:, :hi - s].float()
                tgt = ids[:, s + 1:hi + 1].to(lg.device)
                nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").cpu()
                pos = torch.arange(s + 1, hi + 1).repeat(ids.shape[0])
                acc.add_losses(pos, nll, rows.repeat_interleave(hi - s))
            acc.add_states(e, model, cache, ids.shape[0], int(rows[0]))
            if progress is not None:
                progress.update((e - s) * ids.shape[0])

        cache = stream(model, ids, chunk_size=chunk_size, knobs=knobs, marks=acc.rec_pos, on_chunk=on_chunk,
                       device=device)
        acc.add_decay(cache)


# --- the study ------------------------------------------------------------------------------------

def region_means(res: dict, edges: list[int], lo: int, hi: int) -> tuple[Optional[float], np.ndarray, np.ndarray]:
    """Token-weighted mean loss over positions [lo, hi) (bucket edges must include lo and hi), and the
    per-sample (sum, count) over that region (the bootstrap units)."""
    sel = [i for i in range(len(edges) - 1) if edges[i] >= lo and edges[i + 1] <= hi]
    L = np.asarray(res["loss_samples"], dtype=np.float64)
    C = np.asarray(res["count_samples"], dtype=np.float64)
    s, c = L[:, sel].sum(1), C[:, sel].sum(1)
    mean = float(s.sum() / c.sum()) if c.sum() > 0 else None
    return mean, s, c


def _summary(res: dict, edges: list[int], train_len: int, warmup: int) -> dict:
    """Mean loss within [warmup, L) and beyond [L, T) the training length L, and in the last bucket."""
    T = edges[-1]
    nb = len(edges) - 1
    last = next((res["loss"][i] for i in reversed(range(nb)) if res["loss"][i] is not None), None)
    out = {"loss_within_train_len": region_means(res, edges, warmup, train_len)[0] if warmup < train_len else None,
           "loss_beyond_train_len": region_means(res, edges, train_len, T)[0] if train_len < T else None,
           "loss_last_bucket": last}
    if res["state"]:
        # flat: layers of a hybrid have different head counts (ragged rows)
        norms = np.array([x if x is not None else np.inf for L in res["state"] for row in L["norm"] for x in row])
        out["max_state_norm"] = _num(norms.max()) if norms.size else None
    return out


def bucket_edges(T: int, per_octave: int, train_len: int, warmup: int) -> list[int]:
    """Log-spaced edges plus exact edges at the warm-up position and the training length."""
    return sorted(set(log_edges(T, per_octave)) | {x for x in (warmup, train_len) if 1 < x < T})


def auto_context(res: dict, rec_pos: list[int], train_len: int) -> AutoContext:
    """Per-head in-training norms (the largest over samples and recorded positions <= L) and memory lengths."""
    within = [i for i, p in enumerate(rec_pos) if p <= train_len] or [0]
    norms, mem = {}, {}
    for L in res["state"]:
        lk = (L["layer"], L["key"])
        peak = np.array([[x if x is not None else np.inf for x in row] for row in L["norm_peak"]])
        norms[lk] = [float(peak[within, h].max()) for h in range(L["heads"])]
        if "memory_tokens" in L:
            mem[lk] = [math.inf if m is None else float(m) for m in L["memory_tokens"]]
    return AutoContext(train_len=train_len, head_norms=norms, head_memory=mem)


def evaluate_length(model: LanguageModel, samples: list[np.ndarray], cfg: LengthEvalConfig, *, train_len: int,
                    mitigations: Optional[list[str]] = None, log: Callable[[str], None] = lambda m: None,
                    label: str = "", extra_edges: Sequence[int] = ()) -> dict:
    """Per-position loss (per sample) and state statistics for every mitigation (results dict, JSON-ready
    but for `_snapshots`: {position: {(layer, key): [H, K, V] numpy}} of sample 0 at L and T, unmitigated).

    `extra_edges`: more bucket edges (a study adds every run's training length and warm-up, so runs can be
    compared over the same positions). Raises ValueError for a repeated spec or `state_norm=auto` on a model
    without recurrent state."""
    from lctrain.models import InferenceKnobs
    specs = [parse_mitigation(m) for m in (mitigations or cfg.mitigations)]
    if not any(m.neutral for m in specs):
        specs.insert(0, parse_mitigation("none"))           # auto values and diagnostics read this pass
    specs.sort(key=lambda m: not m.neutral)                  # baseline first
    names = [m.name for m in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"mitigations: the same spec is given twice: {names}")
    T = max(s.size for s in samples)
    warmup = min(cfg.warmup, max(1, train_len // 2))
    edges = sorted(set(bucket_edges(T, cfg.buckets_per_octave, train_len, warmup)) | {e for e in extra_edges if 1 < e < T})
    rec_pos = sorted(set(edges[1:]) | ({train_len} if 0 < train_len < T else set()))
    states = recurrent_layers(model)
    if any(m.state_norm is not None and not isinstance(m.state_norm, float) for m in specs) and not states:
        raise ValueError("state_norm=auto: the model has no recurrent state to normalise")
    tokens = sum(s.size for s in samples)
    prog = Progress(tokens * len(specs), f"{label + ': ' if label else ''}length {T:,} x {len(samples)}", log=log)
    results, auto, snaps = {}, None, None
    for m in specs:
        if m.neutral:
            knobs = InferenceKnobs(record_decay=True)
        else:
            knobs = m.knobs(auto)
        acc = _Accumulator(edges, rec_pos, states, len(samples), snap_pos=[p for p in (train_len, T) if p in rec_pos]
                           if m.neutral else ())
        t0 = time.perf_counter()
        _run_pass(model, samples, knobs, acc, cfg.chunk_size, prog)
        dt = time.perf_counter() - t0
        res = acc.result()
        res["seconds"] = dt
        res["tokens_per_s"] = tokens / max(dt, 1e-9)
        res["strength"] = m.strength(auto) if not m.neutral else None
        res["knob"] = m.knob()
        if knobs.state_norm is not None:
            res["state_norm_cap"] = knobs.state_norm
        if knobs.state_window is not None:
            res["state_window"] = knobs.state_window
        for lk, per in (knobs.heads or {}).items():
            for name, vals in per.items():
                res.setdefault(f"head_{name}", []).append({"layer": lk[0], "key": lk[1],
                                                           "values": [_num(x) for x in vals]})
        res.update(_summary(res, edges, train_len, warmup))
        results[m.name] = res
        if m.neutral and auto is None:
            auto = auto_context(res, rec_pos, train_len)
            snaps = acc.snapshots
        prog.close()
        log(f"{label + ': ' if label else ''}length {T}: {m.name:<28} loss within train len "
            f"{_fmt(res['loss_within_train_len'])}, beyond {_fmt(res['loss_beyond_train_len'])}, last bucket "
            f"{_fmt(res['loss_last_bucket'])} ({dt:.1f}s, {res['tokens_per_s']:,.0f} tok/s)")
    lo, hi = edges[:-1], edges[1:]
    return {"length": T, "train_len": train_len, "warmup": warmup, "samples": len(samples),
            "chunk_size": cfg.chunk_size, "buckets_per_octave": cfg.buckets_per_octave, "edges": edges,
            "buckets": [{"lo": a, "hi": b, "center": math.sqrt(a * max(b - 1, a))} for a, b in zip(lo, hi)],
            "state_positions": rec_pos, "state_layers": [{"layer": l, "key": k, "heads": h} for l, k, h in states],
            "mitigations": results, "peak_rss_bytes": peak_rss_bytes(), "rss_bytes_end": current_rss_bytes(),
            "_snapshots": snaps or {}}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def head_diagnostics(result: dict, top: int = 3) -> dict:
    """The paper's head analysis of the unmitigated pass (Stuffed Mamba §4.2): every head's mean decay
    exp(mean g) and memory length 1 / -mean(g) (tokens), its norm at the training length L and at the end T
    (mean over samples), and the heads ranked by growth |S_T| / |S_L|; the `top` heads' mean / variance /
    max curves. Returns {"heads": [... ranked ...], "top": [...], "positions": [...]}."""
    base = next(iter(result["mitigations"].values()))
    pos = result["state_positions"]
    L, T = result["train_len"], result["length"]
    if not base["state"] or L not in pos or L >= T:
        return {"heads": [], "top": [], "positions": pos}
    iL, iT = pos.index(L), len(pos) - 1
    rows = []
    for layer in base["state"]:
        for h in range(layer["heads"]):
            nL, nT = layer["norm"][iL][h], layer["norm"][iT][h]
            vL, vT = layer["var"][iL][h], layer["var"][iT][h]
            mg = (layer.get("mean_log_decay") or [None] * layer["heads"])[h]
            rows.append({"layer": layer["layer"], "key": layer["key"], "head": h,
                         "mean_decay": None if mg is None else math.exp(mg),
                         "memory_tokens": (layer.get("memory_tokens") or [None] * layer["heads"])[h],
                         "norm_at_train_len": nL, "norm_at_end": nT,
                         "growth": nT / nL if nL and nT is not None and nL > 0 else None,
                         "var_growth": vT / vL if vL and vT is not None and vL > 0 else None,
                         "mean": [r[h] for r in layer["mean"]], "var": [r[h] for r in layer["var"]],
                         "max": [r[h] for r in layer["max"]]})
    rows.sort(key=lambda r: -(r["growth"] if r["growth"] is not None else -1))
    curves = ("mean", "var", "max")
    heads = [{k: v for k, v in r.items() if k not in curves} for r in rows]
    return {"heads": heads, "top": rows[:top], "positions": pos}


def write_length_outputs(result: dict, out_dir: str, title: str = "") -> dict[str, str]:
    """length.json's plots: loss vs position (one line per mitigation), per-head state norm vs position
    (one figure per mitigation), the top heads' mean / variance / max curves and the top head's entry
    histogram at L vs T. Returns {name: path}."""
    from lctrain.eval import plots
    files = {}
    centers = [b["center"] for b in result["buckets"]]
    curves = {name: (centers, r["loss"]) for name, r in result["mitigations"].items()}
    files["loss"] = plots.loss_vs_position(curves, os.path.join(out_dir, "length_loss.png"),
                                           train_lens=[result["train_len"]],
                                           title=title or f"per-position loss ({result['samples']} samples)")
    if result["state_layers"]:
        for name, r in result["mitigations"].items():
            files[f"state_norm/{name}"] = plots.state_vs_position(
                result["state_positions"], r["state"],
                os.path.join(out_dir, f"length_state_norm_{plots.slug(name)}.png"), stat="norm",
                train_len=result["train_len"], title=f"state norm per head vs position ({name})")
        diag = head_diagnostics(result)
        if diag["top"]:
            lab = lambda h: f"layer {h['layer']} head {h['head']} (x{h['growth']:.3g})" if h["growth"] else \
                f"layer {h['layer']} head {h['head']}"
            files["top_heads"] = plots.top_head_curves(
                diag["positions"], [{**h, "label": lab(h)} for h in diag["top"]],
                os.path.join(out_dir, "length_top_heads.png"), train_len=result["train_len"],
                title=f"{title + ': ' if title else ''}heads that grow most past the training length")
            h = diag["top"][0]
            snaps = result.get("_snapshots") or {}
            L, T = result["train_len"], result["length"]
            lk = (h["layer"], h["key"])
            if L in snaps and T in snaps and lk in snaps[L] and lk in snaps[T]:
                files["top_head_hist"] = plots.entry_histogram(
                    {f"at the training length ({L})": snaps[L][lk][h["head"]],
                     f"at position {T}": snaps[T][lk][h["head"]]},
                    os.path.join(out_dir, "length_top_head_hist.png"),
                    title=f"state entries of layer {h['layer']} head {h['head']} (sample 0)")
    return files


def json_ready(result: dict) -> dict:
    """`evaluate_length`'s result without the state snapshots (numpy)."""
    return {k: v for k, v in result.items() if k != "_snapshots"}
