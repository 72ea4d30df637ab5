"""Causal softmax attention over [B, T, H, D], GQA aware, with sliding windows and packed documents.

- CUDA with flash-attn installed and fp16/bf16 inputs: flash-attn (window via `window_size`).
- Otherwise `scaled_dot_product_attention`; sliding windows are computed in query blocks that see
  only their key band, so memory is O(T * W), never a dense T x T mask.

Conventions: `window = W` lets query i see keys j with i - W < j <= i. If Tq < Tk (decoding with a
cache) the queries are the last Tq positions (bottom-right alignment, as flash-attn).
`cu_seqlens` ([N+1], B = 1) makes the packed documents independent.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional GPU extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = flash_attn_varlen_func = None


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)


def attention_uses_flash(q: Tensor) -> bool:
    """Whether `attention` runs flash-attn for these inputs (CUDA, fp16/bf16, flash-attn installed)."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: Optional[int] = None,
              cu_seqlens: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
              scale: Optional[float] = None, block_size: int = 512) -> Tensor:
    """q [B, Tq, H, D], k and v [B, Tk, H_kv, D] -> [B, Tq, H, D]. Documents: `cu_seqlens` [N+1] for one
    packed row (B = 1), or `doc_ids` [B, Tk] int (the document of each key position; queries are the
    last Tq positions) for batches whose rows hold several documents: each row is masked on its own,
    so the cost stays B T^2, not (B T)^2 as after packing the rows into one. Raises ValueError on
    mismatched shapes."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Tq > Tk:
        raise ValueError(f"attention: more queries ({Tq}) than keys ({Tk})")
    if H % Hkv:
        raise ValueError(f"attention: {H} query heads not divisible by {Hkv} kv heads")
    if cu_seqlens is not None and B != 1:
        raise ValueError("attention: cu_seqlens needs batch size 1 (packed documents)")
    if doc_ids is not None and (cu_seqlens is not None or tuple(doc_ids.shape) != (B, Tk)):
        raise ValueError(f"attention: doc_ids must be [B, Tk] = [{B}, {Tk}] (and not with cu_seqlens), "
                         f"got {tuple(doc_ids.shape)}")
    if not causal and (window is not None or Tq != Tk):
        raise ValueError("attention: window / Tq != Tk need causal=True")
    scale = D ** -0.5 if scale is None else scale
    if attention_uses_flash(q):
        ws = (window - 1, 0) if window is not None else (-1, -1)
        if cu_seqlens is not None and Tq == Tk:
            cu = cu_seqlens.to(torch.int32)
            maxlen = int((cu[1:] - cu[:-1]).max())
            o = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, maxlen, maxlen, softmax_scale=scale,
                                       causal=causal, window_size=ws)
            return o.unsqueeze(0)
        if cu_seqlens is None and doc_ids is None:
            return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=ws)

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, D]
    gqa = H != Hkv
    if cu_seqlens is None and doc_ids is None and window is None and (Tq == Tk or not causal):
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)

    shift = Tk - Tq                                  # absolute key index of query i is i + shift
    seg = _segment_ids(cu_seqlens, Tk)[None] if cu_seqlens is not None else doc_ids      # [1 or B, Tk]
    bs = Tq if window is None else max(block_size, window)
    outs = []
    for qs in range(0, Tq, bs):
        qe = min(Tq, qs + bs)
        lo = 0 if window is None else max(0, qs + shift - window + 1)
        hi = qe + shift
        qpos = torch.arange(qs, qe, device=q.device) + shift
        kpos = torch.arange(lo, hi, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= kpos[None, :] > qpos[:, None] - window
        if seg is not None:                              # [B or 1, 1, q, k]: per-row documents
            mask = (mask & (seg[:, kpos][:, None, :] == seg[:, qpos][:, :, None]))[:, None]
        o = F.scaled_dot_product_attention(qh[:, :, qs:qe], kh[:, :, lo:hi], vh[:, :, lo:hi],
                                           attn_mask=mask, scale=scale, enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)


def attention_reference(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None) -> Tensor:
    """Dense fp64-friendly oracle for tests: explicit scores, mask and softmax."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    qpos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    kpos = torch.arange(Tk, device=q.device)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        mask &= kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    if cu_seqlens is not None:
        seg = _segment_ids(cu_seqlens, Tk)
        mask &= seg[kpos] == seg[qpos]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
