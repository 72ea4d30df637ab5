"""Long chunked inference for any model, and the recurrent-state statistics the length study reads.

`stream(model, ids, chunk_size=...)` runs a sequence through the model chunk by chunk with one
`InferenceCache` (recurrent states, conv tails and window-bounded KV caches carried across chunks), so
the logits equal a single full forward, and for linear / windowed models the memory does not grow
with the length: the cache is O(1) in T, and each chunk's activations and logits are O(chunk). Only
full softmax attention keeps an O(T) KV cache (inherent). The caller consumes each chunk's logits as
they come (per-position losses are accumulated into buckets, never stored per token).

Chunk boundaries can be forced at given positions (`marks`); chunked prefill is exact, so where the
boundaries fall changes nothing but when the caller sees the state.

State statistics: `layer_states(model, cache)` finds every recurrent state `[B, H, K, V]` in the cache
(the mixers' cache keys, see `STATE_KEYS`), as the *effective* state the output reads: with the
sliding-window knob that is `S_t - Γ_t S_{t-W}` (the state of the last W tokens), not the running
`S_t` the cache keeps underneath. `head_stats` reduces one to per-head norm / mean / variance / max|.|.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lctrain.models import InferenceCache, InferenceKnobs, LanguageModel

# mixer name -> the cache keys holding its recurrent state(s) (see each mixer's linear_attention call).
# A mixer may instead declare `state_cache_keys` (a tuple of keys) as a class attribute.
STATE_KEYS: dict[str, tuple[str, ...]] = {"mamba2": ("ssm",), "gla": ("state",), "based": ("state",)}


def chunk_bounds(T: int, chunk_size: int, marks: Iterable[int] = ()) -> Iterator[tuple[int, int]]:
    """Consecutive [s, e) covering [0, T) of at most `chunk_size` tokens, with a boundary at every mark."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cuts = sorted({int(m) for m in marks if 0 < int(m) < T} | set(range(chunk_size, T, chunk_size)) | {T})
    s = 0
    for e in cuts:
        if e > s:
            yield s, e
            s = e


@torch.no_grad()
def stream(model: LanguageModel, ids, *, chunk_size: int = 2048, knobs: Optional[InferenceKnobs] = None,
           marks: Iterable[int] = (), on_chunk: Optional[Callable[[int, int, Tensor, InferenceCache], None]] = None,
           cache: Optional[InferenceCache] = None, device=None) -> InferenceCache:
    """Run `ids` ([B, T] tensor or array, sliced lazily: a numpy memmap works) through `model` in chunks.

    `on_chunk(s, e, logits [B, e-s, V], cache)` is called after each chunk (the cache then holds the
    state after token e-1). Returns the cache (state after the whole sequence).
    """
    device = device or next(model.parameters()).device
    cache = model.init_cache(knobs) if cache is None else cache
    T = ids.shape[1]
    for s, e in chunk_bounds(T, chunk_size, marks):
        x = torch.as_tensor(np.asarray(ids[:, s:e]) if not isinstance(ids, Tensor) else ids[:, s:e])
        logits = model(x.to(device=device, dtype=torch.long), cache=cache).logits
        if on_chunk is not None:
            on_chunk(s, e, logits, cache)
    return cache


@torch.no_grad()
def chunked_logits(model: LanguageModel, ids: Tensor, chunk_size: int,
                   knobs: Optional[InferenceKnobs] = None) -> Tensor:
    """All logits [B, T, V] via `stream` (for tests and short inputs; stores O(T V))."""
    parts = []
    stream(model, ids, chunk_size=chunk_size, knobs=knobs, on_chunk=lambda s, e, lg, c: parts.append(lg))
    return torch.cat(parts, 1)


def _state_keys(mixer) -> tuple[str, ...]:
    own = getattr(mixer, "state_cache_keys", None)
    if own is not None:
        return tuple(own)
    return STATE_KEYS.get(getattr(mixer, "name", ""), ())


def effective_state(layer_cache: dict, key: str) -> Optional[Tensor]:
    """The state the output reads: `S` (fp32 [B, H, K, V]) or, with the window knob, `S - Γ L`."""
    S = layer_cache.get(key)
    if S is None:
        return None
    win = layer_cache.get(key + ".win")
    if not win or win.get("lag") is None:
        return S.float()
    L = win["lag"].float()
    if win.get("g") is None:
        return S.float() - L
    logg = win["g"].double().sum(1)                     # [B, H] or [B, H, K]: Σ g over the last W tokens
    gamma = logg.exp().float()
    gamma = gamma[..., None, None] if gamma.dim() == 2 else gamma[..., None]
    return S.float() - gamma * L


def layer_states(model: LanguageModel, cache: InferenceCache) -> list[tuple[int, str, Tensor]]:
    """(layer index, cache key, effective state [B, H, K, V]) of every recurrent state in the cache."""
    out = []
    for i, block in enumerate(model.layers):
        for key in _state_keys(block.mixer):
            S = effective_state(cache.layers[i], key)
            if S is not None:
                out.append((i, key, S))
    return out


def recurrent_layers(model: LanguageModel) -> list[tuple[int, str, int]]:
    """(layer index, cache key, heads) of every recurrent state the model keeps (empty: no linear mixer)."""
    out = []
    for i, block in enumerate(model.layers):
        for key in _state_keys(block.mixer):
            heads = getattr(block.mixer, "nheads", None) or getattr(block.mixer, "n_heads", 0)
            out.append((i, key, int(heads)))
    return out


STAT_NAMES = ("norm", "mean", "var", "max")


def head_stats(S: Tensor) -> dict[str, Tensor]:
    """Per (row, head) statistics of states [B, H, K, V]: Frobenius norm, mean, variance, max |entry|."""
    flat = S.float().flatten(-2)
    return {"norm": flat.norm(dim=-1), "mean": flat.mean(-1), "var": flat.var(-1, unbiased=False),
            "max": flat.abs().amax(-1)}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource
    import sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def log_edges(T: int, per_octave: int) -> list[int]:
    """Integer bucket edges 1 = e_0 < e_1 < ... < e_n = T, about `per_octave` per doubling."""
    if T < 2:
        raise ValueError(f"need at least 2 positions, got {T}")
    n = int(np.ceil(np.log2(T) * per_octave))
    raw = np.unique(np.round(np.exp2(np.arange(n + 1) / per_octave)).astype(np.int64))
    edges = [int(x) for x in raw if x < T] + [T]
    return edges


def bucket_index(edges: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Position -> bucket index for buckets [e_i, e_{i+1})."""
    e = torch.tensor(list(edges[1:-1]), dtype=torch.long)
    return lambda pos: torch.bucketize(pos, e, right=True)
