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
  (`S <- S min(1, c / |S|)`); the output reads the rescaled state. Exact, and chunked (see `_capped`):
  only a scalar recurrence per head runs token by token. `_capped_reference` is the definition.
- `state_window = W`: the output reads the state of only the last W tokens (see `_windowed`).
- per head (`knobs.heads[(layer, key)]`, seeded into the layer cache as `<key>.heads` by
  `InferenceCache`): `{"decay_scale": [H], "state_norm": [H]}` multiply the global decay scale and
  replace the global cap head by head (a head's cap of inf leaves it uncapped).
- `record_decay`: accumulate each head's Σ g and token count into `<key>.decay` (head diagnostics:
  mean log-decay per head, i.e. memory length 1 / -mean(g) tokens).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
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
    heads = cache.get(key + ".heads") or {}
    if knobs is not None and g is not None and knobs.decay_scale != 1.0:
        g = g * knobs.decay_scale
    if g is not None and heads.get("decay_scale") is not None:
        s = heads["decay_scale"].to(g.device, g.dtype)                    # [H]
        g = g * (s if g.dim() == 3 else s[:, None])
    if knobs is not None and knobs.record_decay and g is not None:
        rec = cache.setdefault(key + ".decay", {"sum": 0.0, "tokens": 0})
        rec["sum"] = rec["sum"] + (g.double().sum((0, 1)) if g.dim() == 3 else g.double().mean(-1).sum((0, 1)))
        rec["tokens"] += g.shape[0] * g.shape[1]
    state = cache.get(key)
    norm_cap = knobs.state_norm if knobs is not None else None
    if heads.get("state_norm") is not None:
        norm_cap = heads["state_norm"]
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

def _capped_reference(q, k, v, g, scale, state, cap):
    """The definition, token by token: `S_t = n(exp(g_t) S_{t-1} + k_t v_t^T)` with `n(S) = S min(1, c/|S|)`
    per head (`cap`: a float or a [H] tensor). The test oracle of `_capped`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device) if state is None else state.float()
    cap = torch.as_tensor(cap, dtype=torch.float32, device=q.device).expand(H)
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


def _capped(q, k, v, g, scale, state, cap, chunk: int = 64):
    """`_capped_reference` in chunks: the same states and outputs (fp32 rounding aside), ~one primitive call.

    The cap multiplies the state by a scalar `c_t = min(1, cap / n_t)` per (row, head) after each token,
    so `S_t = diag(c_t exp(g_t)) S_{t-1} + (c_t k_t) v_t^T`: once the factors are known the capped
    recurrence *is* the primitive with gates `g_t + log c_t` and keys `c_t k_t` (one chunked kernel call).
    The factors need the pre-cap norms `n_t^2 = |D_t S_{t-1}|^2 + 2 k_t^T D_t S_{t-1} v_t + |k_t|^2 |v_t|^2`
    (`D_t = diag(exp g_t)`), which a small recurrence gives without forming states: per key row r_t[k] =
    |S_t[k, :]|^2 and, inside a chunk, `(S_{t-1} v_t)[k] = w0[k] (S_0 v_t)[k] + Σ_s w_s[k] k_s[k] (v_s . v_t)`
    with the running weights w (products of c and decay since token s). Only this O(C K) recurrence
    runs token by token (over [B, H, C] tensors for per-head gates, [B, H, C, K] for per-key gates).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    S0 = torch.zeros(B, H, K, V, dtype=torch.float32, device=dev) if state is None else state.float()
    cap = torch.as_tensor(cap, dtype=torch.float32, device=dev).expand(H)
    per_key = g is not None and g.dim() == 4
    kf, vf = k.float(), v.float()
    rows = S0.pow(2).sum(-1)                                                 # [B, H, K]: r[k] = |S[k, :]|^2
    S, outs = S0, []
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        C = c1 - c0
        kc = kf[:, c0:c1].transpose(1, 2)                                    # [B, H, C, K]
        vc = vf[:, c0:c1].transpose(1, 2)                                    # [B, H, C, V]
        vv = vc @ vc.transpose(-1, -2)                                       # [B, H, C(t), C(s)]: v_t . v_s
        sv = torch.einsum("bhkv,bhtv->bhtk", S, vc)                          # [B, H, C, K]: (S_0 v_t)[k]
        kk = kc.pow(2)                                                       # [B, H, C, K]
        vn = vv.diagonal(dim1=-2, dim2=-1)                                   # [B, H, C]: |v_t|^2
        if g is None:
            dec = torch.ones(B, H, C, 1 if not per_key else K, device=dev)
        else:
            gc = g[:, c0:c1].float().transpose(1, 2)                         # [B, H, C] or [B, H, C, K]
            dec = gc.exp() if per_key else gc.exp()[..., None]              # [B, H, C, K or 1]
        # per-head gates: the row sum over k is all the recurrence needs (k_s . ... has no k weighting)
        if not per_key:
            kv = (kc * sv).sum(-1)                                           # [B, H, C]: k_t^T S_0 v_t
            M = (kc @ kc.transpose(-1, -2)) * vv                             # (k_t . k_s)(v_t . v_s)
            d = dec[..., 0]                                                  # [B, H, C]
            args = (d, M, kv, kk.sum(-1) * vn, rows.sum(-1), cap.expand(B, H).contiguous())
            on_cpu = dev.type == "cpu" and not any(a.requires_grad for a in args)
            cvec = _cap_factors_cpu(*args) if on_cpu else _cap_factors(*args)
        else:
            A = torch.einsum("bhsk,bhts->bhtsk", kc, vv)                     # k_s[k] (v_t . v_s)
            w = torch.zeros(B, H, C, K, device=dev)
            w0 = torch.ones(B, H, K, device=dev)
            lc = []
            for t in range(C):
                dt_ = dec[:, :, t]                                           # [B, H, K]
                y = w0 * sv[:, :, t] + (w * A[:, :, t]).sum(-2)              # (S_{t-1} v_t)[k]
                pre = dt_ * dt_ * rows + 2 * dt_ * kc[:, :, t] * y + kk[:, :, t] * vn[..., t, None]
                c = torch.clamp(cap / pre.sum(-1).clamp_min(1e-60).sqrt(), max=1.0)   # [B, H]
                rows = (c * c)[..., None] * pre
                w = w * (c[..., None] * dt_)[..., None, :]
                w0 = w0 * c[..., None] * dt_
                w[:, :, t] = c[..., None]
                lc.append(c)
            cvec = torch.stack(lc, -1)
        lcc = cvec.clamp_min(1e-30).log().transpose(1, 2)                    # [B, C, H]: log c_t
        gg = lcc if g is None else g[:, c0:c1].float() + (lcc[..., None] if per_key else lcc)
        o, S = kernels.gated_linear_attention(q[:, c0:c1].float(), kf[:, c0:c1] * lcc.exp()[..., None],
                                              vf[:, c0:c1], gg, scale=scale, initial_state=S,
                                              output_final_state=True)
        outs.append(o)
        rows = S.pow(2).sum(-1)
    o = torch.cat(outs, 1)
    return o.to(v.dtype), S


@torch.jit.script
def _cap_factors(d: Tensor, M: Tensor, kv: Tensor, kvn: Tensor, rsum: Tensor, cap: Tensor) -> Tensor:
    """The cap factors c_t [B, H, C] of one chunk for per-head gates (see `_capped`): d the decays, M[t, s] =
    (k_t . k_s)(v_t . v_s), kv_t = k_t^T S_0 v_t, kvn_t = |k_t|^2 |v_t|^2, rsum = |S_0|^2. TorchScript: the
    token loop runs without Python overhead per op."""
    C = d.shape[-1]
    w = torch.zeros_like(d)                          # weight of token s's update in S_{t-1}
    w0 = torch.ones_like(rsum)                       # weight of S_0 in S_{t-1}
    cap2 = cap * cap
    out = torch.empty_like(d)
    for t in range(C):
        dt = d[:, :, t]
        cross = w0 * kv[:, :, t] + (w * M[:, :, t]).sum(-1)         # k_t^T S_{t-1} v_t
        n2 = dt * dt * rsum + 2.0 * dt * cross + kvn[:, :, t]
        c = torch.clamp(cap * torch.rsqrt(n2.clamp_min(1e-60)), max=1.0)
        rsum = torch.minimum(n2, cap2)
        f = c * dt
        w = w * f.unsqueeze(-1)
        w0 = w0 * f
        w[:, :, t] = c
        out[:, :, t] = c
    return out


def _cap_factors_cpu(d: Tensor, M: Tensor, kv: Tensor, kvn: Tensor, rsum: Tensor, cap: Tensor) -> Tensor:
    """`_cap_factors` on CPU without autograd: the same loop compiled by numba over float64 arrays (the
    TorchScript loop pays an op dispatch per [B, H] step; this one runs at C speed)."""
    B, H, C = d.shape
    f64 = lambda x, *shape: np.ascontiguousarray(x.detach().double().reshape(*shape).numpy())
    global _cap_loop_compiled
    if _cap_loop_compiled is None:                   # numba imported and the loop compiled on first use only
        import numba
        _cap_loop_compiled = numba.njit(cache=True)(_cap_loop)
    out = _cap_loop_compiled(f64(d, B * H, C), f64(M, B * H, C, C), f64(kv, B * H, C), f64(kvn, B * H, C),
                             f64(rsum, B * H), f64(cap, B * H))
    return torch.from_numpy(out.reshape(B, H, C)).to(d.dtype)


_cap_loop_compiled = None


def _cap_loop(d, M, kv, kvn, rsum, cap):
    """The cap-factor recurrence of `_cap_factors` per (row, head), scalar code for numba: d, kv, kvn
    [BH, C], M [BH, C, C], rsum, cap [BH] (float64) -> c [BH, C]."""
    BH, C = d.shape
    out = np.empty((BH, C))
    w = np.empty(C)
    for h in range(BH):
        rs, w0, cap2 = rsum[h], 1.0, cap[h] * cap[h]
        for t in range(C):
            cross = w0 * kv[h, t]
            for s in range(t):
                cross += w[s] * M[h, t, s]
            dt = d[h, t]
            n2 = dt * dt * rs + 2.0 * dt * cross + kvn[h, t]
            c = min(cap[h] / np.sqrt(max(n2, 1e-60)), 1.0)
            rs = min(n2, cap2)
            f = c * dt
            for s in range(t):
                w[s] *= f
            w0 *= f
            w[t] = c
            out[h, t] = c
    return out


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
