"""Chunked gated linear attention as Triton kernels, forward and backward (the CUDA default).

Work split (as fla's chunk_gla / chunk_simple_gla), chunk BT = 64, per chunk with in-chunk inclusive
cumulative log-decay b (non-increasing, so every exponent below is <= 0; padded rows are masked
*before* exp):
  forward   cumsum   b = cumsum(g) per chunk
            fwd_h    per (sequence, head, K/V block): walk the chunks, store the entering state h_c,
                     h_{c+1} = exp(b_L) h_c + (k exp(b_L - b))^T v
            intra_A  (per-key gates) A_ij = sum_k q_ik k_jk exp(b_ik - b_jk) in 16x16 sub-blocks:
                     off-diagonal blocks as one matmul around a reference row, diagonal ones exactly
            fwd_o    o = scale ((q exp(b)) h_c + (A o causal) v); per-head / no gate build A in place
  backward  bwd_dh   reverse walk: dh_c (gradient of the state leaving chunk c) and d initial_state
            bwd_dv   dv = scale A^T do + (k exp(b_L - b)) dh_c
            dA, intra_dqk  (per-key gates) the A-part of dq, dk in the same sub-block scheme
            bwd_dqk  dq, dk, and dg = reverse-cumsum(q.dq - k.dk) + (last-row terms of b_L)
Every sequence (batch row, or document with cu_seqlens) is chunked on its own via host-built chunk
tables (layout.py), so a chunk never spans a document boundary; rows past a chunk's length are
masked. States and every accumulation are fp32; bf16/fp16 operands feed the tensor-core dots.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from lctrain.kernels.gla_triton_bwd import (_bwd_dh_kernel, _bwd_dqk_kernel, _bwd_dv_kernel, _dA_kernel,
                                            _intra_dqk_kernel)
from lctrain.kernels.gla_triton_fwd import _cumsum_kernel, _fwd_h_kernel, _fwd_o_kernel, _intra_A_kernel
from lctrain.kernels.layout import build_layout

BT = 64   # chunk
BC = 16   # sub-block of the per-key-dim intra-chunk scores


def _block(d: int) -> int:
    return max(16, min(64, triton.next_power_of_2(d)))


class _Tables:
    """Chunk tables of every sequence (rows, or documents) of the flattened token axis."""

    def __init__(self, batch: int, seqlen: int, cu_seqlens: Optional[Tensor], device):
        if cu_seqlens is None:
            cu_seqlens = torch.arange(batch + 1, dtype=torch.int64) * seqlen
        lay = build_layout(1, batch * seqlen, BT, cu_seqlens, device)
        i32 = lambda t: t.to(torch.int32).contiguous()
        self.start = lay.chunk_start.to(torch.int64).contiguous()
        self.len = i32(lay.chunk_len)
        self.seq_chunk0 = i32(lay.doc_chunk0)
        self.seq_nchunks = i32(lay.doc_nchunks)
        self.nchunks = lay.nchunks
        self.nseq = self.seq_chunk0.numel()


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


class _ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, want_final, tab):
        TOT, H, K = q.shape
        V = v.shape[-1]
        gate = 0 if g is None else (1 if g.dim() == 2 else 2)
        BK, BV = _block(K), _block(V)
        NK, NV, NC, N = triton.cdiv(K, BK), triton.cdiv(V, BV), tab.nchunks, tab.nseq
        prec, dev = _prec(q), q.device
        f32 = dict(device=dev, dtype=torch.float32)
        b = A = None
        if gate:
            b = torch.empty(g.shape, **f32)
            if NC:
                _cumsum_kernel[(NC, H, NK if gate == 2 else 1)](g, b, tab.start, tab.len, H, K, BT, BK, gate)
        h = torch.empty(NC, H, K, V, **f32)
        final = torch.empty(N, H, K, V, **f32) if want_final else None
        dummy = h
        _fwd_h_kernel[(NK, NV, N * H)](k, v, b if gate else dummy, h, s0 if s0 is not None else dummy,
                                       final if want_final else dummy, tab.seq_chunk0, tab.seq_nchunks,
                                       tab.start, tab.len, H, K, V, BT, BK, BV, gate, s0 is not None,
                                       want_final, prec)
        if gate == 2:
            A = torch.empty(TOT, H, BT, **f32)
            if NC:
                _intra_A_kernel[(NC, (BT // BC) ** 2, H)](q, k, b, A, tab.start, tab.len, H, K, BT, BC, BK,
                                                          BT // BC, prec)
        o = torch.empty(TOT, H, V, device=dev, dtype=v.dtype)
        if NC:
            _fwd_o_kernel[(NV, NC, H)](q, k, v, b if gate else dummy, h, A if gate == 2 else dummy, o,
                                       tab.start, tab.len, scale, H, K, V, BT, BK, BV, gate, prec)
        ctx.save_for_backward(q, k, v, b, A, h, s0)
        ctx.gate, ctx.scale, ctx.tab, ctx.g_dtype = gate, scale, tab, (g.dtype if g is not None else None)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, b, A, h, s0 = ctx.saved_tensors
        gate, scale, tab = ctx.gate, ctx.scale, ctx.tab
        TOT, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _block(K), _block(V)
        NK, NV, NC, N = triton.cdiv(K, BK), triton.cdiv(V, BV), tab.nchunks, tab.nseq
        prec, dev = _prec(q), q.device
        f32 = dict(device=dev, dtype=torch.float32)
        do = do.contiguous()
        dummy = h
        dh = torch.empty(NC, H, K, V, **f32)
        ds0 = torch.empty(N, H, K, V, **f32) if s0 is not None else None
        dfinal = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        _bwd_dh_kernel[(NK, NV, N * H)](q, do, b if gate else dummy, dh,
                                        dfinal if dfinal is not None else dummy,
                                        ds0 if ds0 is not None else dummy, tab.seq_chunk0, tab.seq_nchunks,
                                        tab.start, tab.len, scale, H, K, V, BT, BK, BV, gate,
                                        dfinal is not None, ds0 is not None, prec)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv = torch.empty_like(v)
        dg = None
        if NC:
            _bwd_dv_kernel[(NV, NC, H)](q, k, b if gate else dummy, A if gate == 2 else dummy, do, dh, dv,
                                        tab.start, tab.len, scale, H, K, V, BT, BK, BV, gate, prec)
            dqa = dka = dummy
            if gate == 2:
                dA = torch.empty(TOT, H, BT, **f32)
                _dA_kernel[(NC, H)](v, do, dA, tab.start, tab.len, scale, H, V, BT, BV, prec)
                dqa, dka = torch.empty(TOT, H, K, **f32), torch.empty(TOT, H, K, **f32)
                _intra_dqk_kernel[(NK, NC * (BT // BC), H)](q, k, b, dA, dqa, dka, tab.start, tab.len, H, K,
                                                            BT, BC, BK, BT // BC, prec)
            dgp = None
            if gate == 1:
                dgp = torch.empty(NK, TOT, H, **f32)
            elif gate == 2:
                dgp = torch.empty(TOT, H, K, **f32)
            _bwd_dqk_kernel[(NK, NC, H)](q, k, v, b if gate else dummy, h, dh, do, dqa, dka, dq, dk,
                                         dgp if gate else dummy, tab.start, tab.len, scale, TOT, H, K, V,
                                         BT, BK, BV, gate, prec)
            if gate:
                dg = (dgp.sum(0) if gate == 1 else dgp).to(ctx.g_dtype)
        elif gate:
            dg = torch.zeros(b.shape, device=dev, dtype=ctx.g_dtype)
        if ds0 is not None:
            ds0 = ds0.to(s0.dtype)
        return dq, dk, dv, dg, ds0, None, None, None


def triton_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
               initial_state: Optional[Tensor], output_final_state: bool,
               cu_seqlens: Optional[Tensor]):
    """Same contract as gated_linear_attention (arguments already checked)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    tab = _Tables(B, T, cu_seqlens, q.device)
    flat = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o, final = _ChunkGLAFunction.apply(flat(q), flat(k), flat(v), flat(g), s0, scale,
                                       output_final_state, tab)
    return o.reshape(B, T, H, V), final
