"""Depthwise causal conv1d with a carried state (Mamba-2 / BASED short conv) and its decode step.

`y_t = bias + sum_w weight[:, w] * x_{t - (W-1) + w}`: tap W-1 is the current token. The state is the
last W-1 inputs, sequence-first `[N, W-1, D]` (oldest first). History is zero (or initial_state) at
each document start. Batch rows are treated as documents of one packed row, so a single gather per
tap serves both layouts (no loop over documents).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, D], got {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [D={D}, W], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"causal_conv1d: bias must be [D={D}], got {tuple(bias.shape)}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                  cu_seqlens: Optional[Tensor] = None):
    """x [B, T, D], weight [D, W], bias [D] | None, initial_state [N, W-1, D] | None -> (y, final_state)."""
    _check(x, weight, bias)
    B, T, D = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=x.device) * T
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or B != 1:
            raise ValueError("causal_conv1d: cu_seqlens must be [N+1] with x of batch size 1")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens.diff() < 0).any()):
            raise ValueError(f"causal_conv1d: cu_seqlens must rise from 0 to T={T}")
        cu = cu_seqlens.to(x.device).long()
    N = cu.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, W - 1, D):
        raise ValueError(f"causal_conv1d: initial_state must be [N={N}, W-1={W - 1}, D={D}], "
                         f"got {tuple(initial_state.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(B * T, D)
    hist = (initial_state.to(flat.dtype).reshape(N * (W - 1), D) if initial_state is not None
            else flat.new_zeros(0, D))
    # source rows: the tokens, then every document's history, then one zero row
    src = torch.cat([flat, hist, flat.new_zeros(1, D)], 0)
    zero_row = src.shape[0] - 1
    pos = torch.arange(B * T, device=x.device)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    off = pos - cu[doc]                                    # offset inside the document

    def source(doc_i, off_i):
        """Row of `src` holding input number `off_i` of document `doc_i` (negative = history)."""
        tok = cu[doc_i] + off_i
        if initial_state is None:
            return torch.where(off_i >= 0, tok, zero_row)
        h = B * T + doc_i * (W - 1) + (W - 1) + off_i
        return torch.where(off_i >= 0, tok, torch.where(off_i >= -(W - 1), h, zero_row))

    y = flat.new_zeros(B * T, D, dtype=dt) if bias is None else bias.to(dt).expand(B * T, D)
    for w in range(W):
        shift = W - 1 - w
        y = y + src.index_select(0, source(doc, off - shift)).to(dt) * weight[:, w].to(dt)
    y = y.to(x.dtype).reshape(B, T, D)
    if not output_final_state:
        return y, None
    docs = torch.arange(N, device=x.device)
    lens = cu[1:] - cu[:-1]
    offs = lens[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)[None, :]   # [N, W-1]
    idx = source(docs[:, None].expand_as(offs), offs)
    return y, src.index_select(0, idx.reshape(-1)).reshape(N, W - 1, D)


class _ShortConv(torch.autograd.Function):
    """Depthwise causal conv (+ SiLU) as W shifted multiply-adds over a zero-padded copy of x, with a
    hand-written backward (no index tensors, no per-tap autograd nodes). Taps that reach across a
    document start are masked by `offsets` (each token's index inside its document)."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, silu):
        B, T, D = x.shape
        W = weight.shape[1]
        xp = F.pad(x, (0, 0, W - 1, 0))                                 # [B, W-1+T, D]
        masks = [None] + [(offsets >= s).unsqueeze(-1).to(x.dtype) if offsets is not None else None
                          for s in range(1, W)]
        y = x * weight[:, W - 1]
        for s in range(1, W):                                           # tap W-1-s reads x_(t-s)
            xs = xp[:, W - 1 - s:W - 1 - s + T]
            y.addcmul_(xs if masks[s] is None else xs * masks[s], weight[:, W - 1 - s])
        if bias is not None:
            y += bias
        ctx.save_for_backward(xp, weight, y if silu else None, offsets)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(y) if silu else y

    @staticmethod
    def backward(ctx, dy):
        xp, weight, pre, offsets = ctx.saved_tensors
        T, W = dy.shape[1], weight.shape[1]
        if ctx.silu:                                                    # silu'(u) = s (1 + u (1 - s))
            sg = torch.sigmoid(pre)
            dy = dy * sg * (1 + pre * (1 - sg))
        dxp = torch.zeros_like(xp)
        dw = torch.empty_like(weight)
        for s in range(W):
            g = dy if (s == 0 or offsets is None) else dy * (offsets >= s).unsqueeze(-1).to(dy.dtype)
            tap = W - 1 - s
            dxp[:, tap:tap + T].addcmul_(g, weight[:, tap])
            dw[:, tap] = (g * xp[:, tap:tap + T]).sum((0, 1))
        db = dy.sum((0, 1)) if ctx.has_bias else None
        return dxp[:, W - 1:], dw, db, None, None


def short_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, offsets: Optional[Tensor] = None,
               activation: Optional[str] = None) -> Tensor:
    """The training-path depthwise causal conv (no carried state), fused with SiLU: x [B, T, D] ->
    [B, T, D] (x's dtype, fp32 or wider), weight [D, W], bias [D] | None; `offsets` [B, T] int is each
    token's index inside its document (history is zero at every document start; None: one document
    per row); activation None | "silu". Same result as `causal_conv1d` (the reference, which also
    carries states) followed by the activation; see tests/test_fused.py."""
    _check(x, weight, bias)
    if activation not in (None, "silu"):
        raise ValueError(f"short_conv: activation must be None or 'silu', got {activation!r}")
    if offsets is not None and tuple(offsets.shape) != tuple(x.shape[:2]):
        raise ValueError(f"short_conv: offsets must be [B, T] = {list(x.shape[:2])}, got {list(offsets.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    y = _ShortConv.apply(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), offsets,
                         activation == "silu")
    return y.to(x.dtype)


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    """One token: x [B, D], state [B, W-1, D] -> (y [B, D], new_state [B, W-1, D])."""
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_step: x must be [B, D], got {tuple(x.shape)}")
    _check(x[:, None], weight, bias)
    B, D = x.shape
    W = weight.shape[1]
    if tuple(state.shape) != (B, W - 1, D):
        raise ValueError(f"causal_conv1d_step: state must be [B={B}, W-1={W - 1}, D={D}], "
                         f"got {tuple(state.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat([state.to(x.dtype), x[:, None]], 1)           # [B, W, D], oldest first
    y = (window.to(dt) * weight.to(dt).t()[None]).sum(1)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype), window[:, 1:]
