"""Token-by-token gated linear attention: the oracle every other backend is tested against.

Plain autograd over the literal recurrence `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`.
Documents (cu_seqlens) are run one after the other; this path favours obviousness over speed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _run(q, k, v, g, scale, state):
    """q, k [B, T, H, K], v [B, T, H, V], g None | [B, T, H] | [B, T, H, K], state [B, H, K, V]."""
    outs = []
    # unbind, not [:, t]: a slice's backward writes a full-size zero gradient (quadratic in T)
    qs, ks, vs = q.unbind(1), k.unbind(1), v.unbind(1)
    decays = g.exp().unbind(1) if g is not None else None
    for t in range(q.shape[1]):
        if decays is not None:
            d = decays[t]
            state = state * (d[..., None, None] if d.dim() == 2 else d[..., None])
        state = state + ks[t][..., :, None] * vs[t][..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qs[t], state) * scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, state


def recurrent_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
                  initial_state: Optional[Tensor], output_final_state: bool,
                  cu_seqlens: Optional[Tensor]):
    dt = torch.promote_types(q.dtype, torch.float32)
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    g = None if g is None else g.to(dt)
    if cu_seqlens is None:
        s0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
        o, s = _run(q, k, v, g, scale, s0)
        return o, (s if output_final_state else None)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for d in range(len(bounds) - 1):
        a, b = bounds[d], bounds[d + 1]
        s0 = q.new_zeros(1, H, K, V) if initial_state is None else initial_state[d:d + 1].to(dt)
        o, s = _run(q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b], scale, s0)
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)
