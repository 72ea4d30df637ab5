"""`lctrain eval length`: the state-collapse (length-extrapolation) study of one model.

Input text (say which in the results: `source`):
- `concat` (default): held-out documents of the run's corpus (the validation split by doc-id hash,
  read from the whole source, so `data.max_bytes` does not limit it), in a seeded order per sample,
  joined by a blank line into one stream with no end-of-document token and no state reset: one long
  source-code-like text far beyond the training length. If the held-out pool is shorter than the
  requested length it is cycled (reported as `wrapped`).
- `document`: the longest held-out documents, one per sample, each cut at the requested length;
  positions past a document's end contribute nothing (see `count` per bucket).
- `--text FILE ...`: the given text files (one document each) instead of the held-out split.

Per position t (the index of the predicted token, 1..T-1) the next-token loss is accumulated into
log-spaced buckets and averaged over samples. The recurrent state of every linear layer is read at the
bucket edges (state after that many tokens) and reduced per head to norm / mean / variance / max|.|
(the effective state, see inference.py), averaged over samples (max: maximum). Every mitigation spec
(mitigations.py) is one more pass over the same samples with the knobs set.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lctrain.config import LengthEvalConfig, Recipe
from lctrain.data.corpus import is_validation, iter_documents
from lctrain.eval.inference import (STAT_NAMES, bucket_index, current_rss_bytes, head_stats, layer_states,
                                    log_edges, peak_rss_bytes, recurrent_layers, stream)
from lctrain.eval.mitigations import parse_mitigation
from lctrain.models import LanguageModel

SEPARATOR = "\n\n"


# --- input text -----------------------------------------------------------------------------------

def _heldout_docs(recipe: Recipe, tokenizer, need: Optional[int]) -> tuple[list[np.ndarray], str]:
    """Tokenized held-out documents, in corpus order, until `need` tokens are collected (None: all)."""
    data = dataclasses.replace(recipe.data, max_bytes=None)
    frac = data.val_fraction
    if frac <= 0:
        raise ValueError("eval length: the run's data.val_fraction is 0, so it has no held-out documents; "
                         "pass --text FILE")
    docs, n = [], 0
    for doc_id, text in iter_documents(data):
        if not is_validation(doc_id, frac):
            continue
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        if ids.size:
            docs.append(ids)
            n += ids.size
        if need is not None and n >= need:
            break
    if not docs:
        raise ValueError("eval length: the run's corpus has no held-out documents; pass --text FILE")
    return docs, f"held-out split of the run's corpus (data.source={data.source}, val_fraction={frac})"


def _text_docs(paths: Sequence[str], tokenizer) -> tuple[list[np.ndarray], str]:
    docs = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"--text: file not found: {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            ids = np.asarray(tokenizer.encode(f.read()), dtype=np.int32)
        if ids.size:
            docs.append(ids)
    if not docs:
        raise ValueError("--text: the given files hold no text")
    return docs, f"text files: {', '.join(paths)}"


def build_samples(recipe: Recipe, tokenizer, cfg: LengthEvalConfig,
                  text_files: Optional[Sequence[str]] = None) -> tuple[list[np.ndarray], dict]:
    """`cfg.samples` token arrays of (up to, for `document`) `cfg.length` tokens, and a description.

    concat reads held-out documents until it has `samples x length` tokens (each sample is a different
    seeded order of that pool); document reads all of them to find the longest."""
    T = cfg.length
    need = None if cfg.source == "document" else cfg.samples * T
    toks, origin = _text_docs(text_files, tokenizer) if text_files else _heldout_docs(recipe, tokenizer, need)
    sep = np.asarray(tokenizer.encode(SEPARATOR), dtype=np.int32)
    pool = int(sum(t.size for t in toks))
    samples, wrapped = [], False
    if cfg.source == "document":
        order = sorted(range(len(toks)), key=lambda i: -toks[i].size)[:cfg.samples]
        samples = [toks[i][:T] for i in order if toks[i].size >= 2]
    else:
        for k in range(cfg.samples):
            rng = random.Random(f"length:{cfg.seed}:{k}")
            parts, n, rounds = [], 0, 0
            while n < T:
                perm = list(range(len(toks)))
                rng.shuffle(perm)
                wrapped |= rounds > 0
                rounds += 1
                for i in perm:
                    parts += [toks[i], sep]
                    n += toks[i].size + sep.size
                    if n >= T:
                        break
            samples.append(np.concatenate(parts)[:T])
    info = {"source": cfg.source, "text": origin, "documents": len(toks), "pool_tokens": pool,
            "wrapped": wrapped, "sample_tokens": [int(s.size) for s in samples],
            "separator": SEPARATOR if cfg.source == "concat" else None}
    return samples, info


# --- one pass -------------------------------------------------------------------------------------

class _Accumulator:
    """Bucketed loss sums and per-head state statistics at recording positions, over samples."""

    def __init__(self, edges: list[int], rec_pos: list[int], states: list[tuple[int, str, int]]):
        self.edges = edges
        self.nb = len(edges) - 1
        self.bucket = bucket_index(edges)
        self.loss = torch.zeros(self.nb, dtype=torch.float64)
        self.count = torch.zeros(self.nb, dtype=torch.float64)
        self.rec_pos = rec_pos
        self.rec_index = {p: i for i, p in enumerate(rec_pos)}
        self.states = states
        self.stat_sum = {(l, k): {s: np.zeros((len(rec_pos), h)) for s in STAT_NAMES} for l, k, h in states}
        self.stat_n = {(l, k): np.zeros(len(rec_pos)) for l, k, h in states}
        self.nonfinite = 0

    def add_losses(self, pos: torch.Tensor, nll: torch.Tensor):
        ok = torch.isfinite(nll)
        self.nonfinite += int((~ok).sum())
        b = self.bucket(pos[ok])
        self.loss += torch.bincount(b, weights=nll[ok].double(), minlength=self.nb)
        self.count += torch.bincount(b, minlength=self.nb).double()

    def add_states(self, pos: int, model, cache, rows: int):
        i = self.rec_index.get(pos)
        if i is None:
            return
        for layer, key, S in layer_states(model, cache):
            st = head_stats(S[:rows])
            acc = self.stat_sum[(layer, key)]
            for name in STAT_NAMES:
                v = st[name].double().cpu().numpy()          # [rows, H]
                if name == "max":
                    acc[name][i] = np.maximum(acc[name][i], v.max(0)) if self.stat_n[(layer, key)][i] else v.max(0)
                else:
                    acc[name][i] += v.sum(0)
            self.stat_n[(layer, key)][i] += rows

    def result(self) -> dict:
        loss = [float(self.loss[i] / self.count[i]) if self.count[i] > 0 else None for i in range(self.nb)]
        layers = []
        for layer, key, h in self.states:
            n = np.maximum(self.stat_n[(layer, key)], 1)[:, None]
            acc = self.stat_sum[(layer, key)]
            entry = {"layer": layer, "key": key, "heads": h}
            for name in STAT_NAMES:
                v = acc[name] if name == "max" else acc[name] / n
                entry[name] = [[_num(x) for x in row] for row in v]
            layers.append(entry)
        return {"loss": loss, "count": [int(c) for c in self.count.tolist()], "state": layers,
                "nonfinite_losses": self.nonfinite}


def _num(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


@torch.no_grad()
def _run_pass(model: LanguageModel, samples: list[np.ndarray], knobs, acc: _Accumulator, chunk_size: int,
              batch: bool) -> None:
    device = next(model.parameters()).device
    groups = [samples] if batch and len({s.size for s in samples}) == 1 else [[s] for s in samples]
    for group in groups:
        ids = torch.from_numpy(np.stack(group).astype(np.int64))
        T = ids.shape[1]

        def on_chunk(s, e, logits, cache, ids=ids, T=T):
            hi = min(e, T - 1)                         # the last token predicts nothing
            if hi > s:
                lg = logits[:, :hi - s].float()
                tgt = ids[:, s + 1:hi + 1].to(lg.device)
                nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").cpu()
                pos = torch.arange(s + 1, hi + 1).repeat(ids.shape[0])
                acc.add_losses(pos, nll)
            acc.add_states(e, model, cache, ids.shape[0])

        stream(model, ids, chunk_size=chunk_size, knobs=knobs, marks=acc.rec_pos, on_chunk=on_chunk, device=device)


# --- the study ------------------------------------------------------------------------------------

def _summary(res: dict, edges: list[int], train_len: int) -> dict:
    """Mean loss inside / beyond the training length (token-weighted over buckets), and at the end."""
    def mean(sel):
        num = sum(res["loss"][i] * res["count"][i] for i in sel if res["loss"][i] is not None)
        den = sum(res["count"][i] for i in sel if res["loss"][i] is not None)
        return num / den if den else None
    nb = len(edges) - 1
    inside = [i for i in range(nb) if edges[i + 1] <= train_len]
    beyond = [i for i in range(nb) if edges[i] >= train_len]
    last = next((res["loss"][i] for i in reversed(range(nb)) if res["loss"][i] is not None), None)
    out = {"loss_within_train_len": mean(inside), "loss_beyond_train_len": mean(beyond), "loss_last_bucket": last}
    if res["state"]:
        # flat: layers of a hybrid have different head counts (ragged rows)
        norms = np.array([x if x is not None else np.inf for L in res["state"] for row in L["norm"] for x in row])
        out["max_state_norm"] = _num(norms.max()) if norms.size else None
    return out


def evaluate_length(model: LanguageModel, samples: list[np.ndarray], cfg: LengthEvalConfig, *, train_len: int,
                    mitigations: Optional[list[str]] = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Per-position loss and state statistics for every mitigation (results dict, JSON-ready)."""
    specs = [parse_mitigation(m) for m in (mitigations or cfg.mitigations)]
    needs_auto = any(m.state_norm == "auto" for m in specs)
    if needs_auto and not any(m.neutral for m in specs):
        specs.insert(0, parse_mitigation("none"))           # the auto cap is read off the unmitigated pass
    specs.sort(key=lambda m: not m.neutral)                  # baseline first
    names = [m.name for m in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"mitigations: the same spec is given twice: {names}")
    T = max(s.size for s in samples)
    edges = log_edges(T, cfg.buckets_per_octave)
    rec_pos = sorted(set(edges[1:]) | ({train_len} if 0 < train_len < T else set()))
    states = recurrent_layers(model)
    if needs_auto and not states:
        raise ValueError("state_norm=auto: the model has no recurrent state to normalise")
    results, auto_norm = {}, None
    batch = cfg.source == "concat"
    for m in specs:
        if m.state_norm == "auto":
            knobs = m.knobs(auto_norm)
        else:
            knobs = m.knobs()
        acc = _Accumulator(edges, rec_pos, states)
        t0 = time.perf_counter()
        _run_pass(model, samples, knobs, acc, cfg.chunk_size, batch)
        dt = time.perf_counter() - t0
        res = acc.result()
        res["seconds"] = dt
        res["tokens_per_s"] = sum(s.size for s in samples) / max(dt, 1e-9)
        if knobs.state_norm is not None:
            res["state_norm_cap"] = knobs.state_norm
        res.update(_summary(res, edges, train_len))
        results[m.name] = res
        if m.neutral and states:
            within = [i for i, p in enumerate(rec_pos) if p <= train_len]
            auto_norm = max((max((x for x in res_l["norm"][i] if x is not None), default=0.0)
                             for res_l in res["state"] for i in within), default=None)
            res["max_state_norm_within_train_len"] = auto_norm
        log(f"length {T}: {m.name:<28} loss within train len {_fmt(res['loss_within_train_len'])}, beyond "
            f"{_fmt(res['loss_beyond_train_len'])}, last bucket {_fmt(res['loss_last_bucket'])} "
            f"({dt:.1f}s, {res['tokens_per_s']:,.0f} tok/s)")
    lo = edges[:-1]
    hi = edges[1:]
    return {"length": T, "train_len": train_len, "samples": len(samples), "chunk_size": cfg.chunk_size,
            "buckets_per_octave": cfg.buckets_per_octave,
            "buckets": [{"lo": a, "hi": b, "center": math.sqrt(a * max(b - 1, a))} for a, b in zip(lo, hi)],
            "state_positions": rec_pos, "state_layers": [{"layer": l, "key": k, "heads": h} for l, k, h in states],
            "mitigations": results, "peak_rss_bytes": peak_rss_bytes(), "rss_bytes_end": current_rss_bytes()}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def write_length_outputs(result: dict, out_dir: str, title: str = "") -> dict[str, str]:
    """length.json's plots: loss vs position (one line per mitigation) and per-head state norm vs
    position (one figure per mitigation). Returns {name: path}."""
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
    return files
