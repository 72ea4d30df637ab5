"""The gated linear-attention primitive (DESIGN.md §2): argument checks, backend choice, decode step.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

Backends: "recurrent" (token-by-token oracle), "chunk" (chunked torch, default on CPU),
"triton" (fused chunked kernels, default on CUDA); "auto" picks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from lctrain.kernels.gla_chunk import chunk_gla
from lctrain.kernels.gla_recurrent import recurrent_gla

BACKENDS = ("auto", "recurrent", "chunk", "triton")


def _shape(t) -> str:
    return "None" if t is None else str(list(t.shape))


def check_gla_args(q, k, v, g, initial_state, cu_seqlens) -> int:
    """Validate shapes; return N, the number of independent sequences."""
    if q.dim() != 4:
        raise ValueError(f"gated_linear_attention: q must be [B, T, H, K], got {_shape(q)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"gated_linear_attention: k must be [B, T, H, K] = {list(q.shape)}, got {_shape(k)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gated_linear_attention: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {_shape(v)}")
    if g is not None and g.shape not in (torch.Size([B, T, H]), q.shape):
        raise ValueError(f"gated_linear_attention: g must be None, [B, T, H] = [{B}, {T}, {H}] or "
                         f"[B, T, H, K] = {list(q.shape)}, got {_shape(g)}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"gated_linear_attention: cu_seqlens must be an int tensor [N+1], "
                             f"got {_shape(cu_seqlens)} {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"gated_linear_attention: cu_seqlens needs q of shape [1, T, H, K], got {_shape(q)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"gated_linear_attention: cu_seqlens must be non-decreasing from 0 to T={T}, got {cu}")
        N = len(cu) - 1
    if initial_state is not None and initial_state.shape != torch.Size([N, H, K, v.shape[-1]]):
        raise ValueError(f"gated_linear_attention: initial_state must be [N, H, K, V] = "
                         f"[{N}, {H}, {K}, {v.shape[-1]}], got {_shape(initial_state)}")
    return N


def _triton_ok(q: Tensor) -> bool:
    try:
        from lctrain.kernels import gla_triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing
        return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def gated_linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, *,
                           scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                           output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                           backend: str = "auto"):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K] (log-decay <= 0);
    initial_state [N, H, K, V] (N = B, or documents with cu_seqlens [N+1] and B = 1).

    Returns (o [B, T, H, V] in v's dtype, final_state [N, H, K, V] fp32 or None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"gated_linear_attention: backend must be one of {BACKENDS}, got {backend!r}")
    check_gla_args(q, k, v, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if _triton_ok(q) else "chunk"
    args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if backend == "recurrent":
        return recurrent_gla(*args)
    if backend == "chunk":
        return chunk_gla(*args)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("gated_linear_attention: backend='triton' needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")
    from lctrain.kernels.gla_triton import triton_gla
    return triton_gla(*args)


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], state: Tensor, *,
             scale: Optional[float] = None):
    """One decode step: q, k [B, H, K], v [B, H, V], g None | [B, H] | [B, H, K], state [B, H, K, V]
    -> (o [B, H, V] in v's dtype, new_state fp32)."""
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"gla_step: q and k must be [B, H, K], got {_shape(q)} and {_shape(k)}")
    B, H, K = q.shape
    if v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gla_step: v must be [B, H, V] = [{B}, {H}, V], got {_shape(v)}")
    V = v.shape[-1]
    if g is not None and g.shape not in (torch.Size([B, H]), q.shape):
        raise ValueError(f"gla_step: g must be None, [B, H] = [{B}, {H}] or [B, H, K] = [{B}, {H}, {K}], "
                         f"got {_shape(g)}")
    if state.shape != torch.Size([B, H, K, V]):
        raise ValueError(f"gla_step: state must be [B, H, K, V] = [{B}, {H}, {K}, {V}], got {_shape(state)}")
    scale = K ** -0.5 if scale is None else float(scale)
    dt = torch.promote_types(q.dtype, torch.float32)
    state = state.to(dt)
    if g is not None:
        decay = g.to(dt).exp()
        state = state * (decay[..., None, None] if g.dim() == 2 else decay[..., None])
    state = state + k.to(dt)[..., :, None] * v.to(dt)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(dt), state) * scale
    return o.to(v.dtype), state
