"""Shared machinery of the recurrent mixers (Mamba-2, GLA, BASED): the primitive and the short conv on
the training path (through `ctx.ops`) and on the decoding path (a per-layer cache dict), and the
training-free state-collapse knobs (`InferenceKnobs`, reached as `ctx.knobs` while decoding).

Cache layout (per layer dict, keys prefixed by the caller so one layer may hold several states):
- `<key>`: the recurrent state `[B, H, K, V]` fp32 after the last consumed token.
- `<key>.conv`: the conv tail `[B, W-1, D]` (the last W-1 inputs of the causal conv).
- `<key>.win`: only with `knobs.state_window` (see `_windowed`).

Knobs (all off by default; neutral values take the untouched code path, so results are bit-identical):
- `decay_scale = s`: `g <- s * g` (Mamba-2 passes `g = A dt`, so only dt's effect on the decay is
  scaled, not the input `x dt`). s < 1 forgets more slowly, s > 1 faster. No effect where `g = None`.
- `state_norm = c`: after every token, each head's state is rescaled to Frobenius norm <= c
  (`S <- S min(1, c / |S|)`); the output reads the rescaled state. The cap makes the recurrence
  nonlinear, so this path runs token by token (O(T) Python steps); chunk sizes do not change results.
- `state_window = W`: the output reads the state of only the last W tokens (see `_windowed`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lctrain import kernels


# --- training path / cache dispatch ---------------------------------------------------------------

def check_cache_docs(ctx) -> None:
    """Decoding caches hold one sequence per batch row: packed documents are a training-path feature."""
    ds = ctx.doc_start
    if ds is None:
        return
    inner = bool(ds[:, 1:].any()) if ds.shape[1] > 1 else False
    if inner or (ctx.position_offset > 0 and bool(ds[:, 0].any())):
        raise ValueError("document starts inside a cached (decoding) stream are not supported: "
                         "use one cache per document")


def causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], ctx, cache: Optional[dict], key: str,
                activation: Optional[str] = "silu") -> Tensor:
    """Depthwise causal conv over [B, T, D] (weight [D, W]); with a cache, continues from its tail."""
    if cache is None:
        return ctx.ops.causal_conv(x, weight, bias, doc_start=ctx.doc_start, activation=activation)
    state = cache.get(key)
    if x.shape[1] == 1:
        if state is None:
            state = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2])
        y, state = kernels.causal_conv1d_step(x[:, 0], state, weight, bias)
        y = y[:, None]
    else:
        y, state = kernels.causal_conv1d(x, weight, bias, initial_state=state, output_final_state=True)
    cache[key] = state
    return F.silu(y) if activation == "silu" else y


def linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], *, scale: float, ctx,
                     cache: Optional[dict], key: str) -> Tensor:
    """The primitive (DESIGN.md §2): through `ctx.ops` when training, from/into `cache[key]` when decoding."""
    if cache is None:
        o, _ = ctx.ops.linear_attention(q, k, v, g, scale=scale, doc_start=ctx.doc_start)
        return o
    check_cache_docs(ctx)
    knobs = getattr(ctx, "knobs", None)
    if knobs is not None and g is not None and knobs.decay_scale != 1.0:
        g = g * knobs.decay_scale
    state = cache.get(key)
    norm_cap = knobs.state_norm if knobs is not None else None
    window = knobs.state_window if knobs is not None else None
    if norm_cap is not None and window is not None:
        raise ValueError("state_norm and state_window cannot be combined (the window subtracts states)")
    if norm_cap is not None:
        o, state = _capped(q, k, v, g, scale, state, norm_cap)
    elif window is not None:
        o, state = _windowed(q, k, v, g, scale, state, cache, key + ".win", window)
    else:
        o, state = _run(q, k, v, g, scale, state)
    cache[key] = state
    return o


def _run(q, k, v, g, scale, state):
    """One continuation of the primitive: the fused kernel for chunks, the single-step form for T = 1."""
    if q.shape[1] == 1 and state is not None:
        o, state = kernels.gla_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0], state,
                                    scale=scale)
        return o[:, None], state
    return kernels.gated_linear_attention(q, k, v, g, scale=scale, initial_state=state,
                                          output_final_state=True)


# --- knobs ------------------------------------------------------------------------------------------

def _capped(q, k, v, g, scale, state, cap: float):
    """Token-by-token recurrence with every head's state norm capped at `cap` after each update."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device) if state is None else state.float()
    outs = []
    for t in range(T):
        if g is not None:
            d = g[:, t].float().exp()
            S = S * (d[..., None, None] if d.dim() == 2 else d[..., None])
        S = S + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        norm = S.flatten(-2).norm(dim=-1)                                    # [B, H]
        S = S * torch.clamp(cap / norm.clamp_min(1e-30), max=1.0)[..., None, None]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(outs, 1).to(v.dtype), S


def _windowed(q, k, v, g, scale, state, cache: dict, key: str, W: int):
    """Sliding window via state difference: o_t = scale q_t (S_t - Γ_t S_{t-W}), Γ_t = Π_{s=t-W+1..t} exp(g_s).

    `S_t - Γ_t S_{t-W}` is exactly the state built from the last W tokens only. Bounded memory: the
    cache keeps, besides S, the lagged state L = S_{t-W} and a ring of the last W tokens' (k, v, g)
    (W·H·(2K+V) numbers, like a KV cache of W tokens; zeros before the stream's start, which add
    nothing). The lagged state obeys the same recurrence fed with the tokens leaving the window,
    `L_t = exp(g_{t-W}) L_{t-1} + k_{t-W}^T v_{t-W}`, and its read-out `q_t Γ_t L_t` is the primitive
    with queries `q_t ⊙ Γ_t` (Γ broadcasts over K for per-head gates). So any chunk — a prefill chunk
    or one decoded token — costs two primitive calls, never a per-token loop.
    Caveat: the difference cancels in fp32 when S is large and decays ≈ 1 (the collapse regime);
    the error is ~1e-7 relative to |S_t|.
    """
    B, T, H, K = q.shape
    win = cache.get(key)
    if win is None:
        zk = k.new_zeros(B, W, H, K)
        gz = None if g is None else g.new_zeros(B, W, *g.shape[2:]).float()
        win = {"k": zk, "v": v.new_zeros(B, W, H, v.shape[-1]), "g": gz, "lag": None}
    k_all = torch.cat([win["k"], k], 1)                         # [B, W+T, ...]: token t at index W + t
    v_all = torch.cat([win["v"], v], 1)
    o, state = _run(q, k, v, g, scale, state)
    if g is None:
        q_lag, g_all, g_lag = q, None, None
    else:
        g_all = torch.cat([win["g"], g.float()], 1)
        c = torch.cumsum(g_all.double(), 1)
        logdec = (c[:, W:] - c[:, :T]).float()                  # Σ g over (t-W, t]
        gamma = logdec.exp()
        q_lag = q * (gamma[..., None] if gamma.dim() == 3 else gamma).to(q.dtype)
        g_lag = g_all[:, :T]
    o_lag, lag = _run(q_lag, k_all[:, :T], v_all[:, :T], g_lag, scale, win["lag"])
    cache[key] = {"k": k_all[:, T:], "v": v_all[:, T:], "g": None if g_all is None else g_all[:, T:],
                  "lag": lag}
    return o - o_lag, state


# --- small shared layers ------------------------------------------------------------------------------

def gated_rmsnorm(x: Tensor, gate: Tensor, weight: Tensor, group: int, eps: float, norm_first: bool) -> Tensor:
    """RMSNorm over groups of `group` channels, gated by silu(gate).

    norm_first=False: norm(x * silu(gate)) (Mamba-2's RMSNormGated); True: norm(x) * silu(gate) (GLA).
    `weight` has `group` (shared by every group) or x.shape[-1] entries.
    """
    dtype = x.dtype
    xf = x.float()
    if not norm_first:
        xf = xf * F.silu(gate.float())
    shp = xf.shape
    xg = xf.reshape(*shp[:-1], shp[-1] // group, group)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    if weight.numel() == group:
        xg = xg * weight.float()
    y = xg.reshape(shp)
    if weight.numel() != group:
        y = y * weight.float()
    if norm_first:
        y = y * F.silu(gate.float())
    return y.to(dtype)


def init_conv_(weight: Tensor, bias: Optional[Tensor]) -> None:
    """nn.Conv1d's default init for a depthwise conv (fan_in = width): U(-1/sqrt(W), 1/sqrt(W))."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


def chunked_flops(heads: int, k: int, v: int, chunk: int = 64) -> float:
    """Forward FLOPs per token of the chunked primitive: the intra-chunk causal (q k^T) v
    (~chunk/2 keys of K + V each, x2 for multiply-add) plus the inter-chunk state read-out and update
    (2 K V each)."""
    return heads * (chunk * (k + v) + 4.0 * k * v)
