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
  backward  cumsum, fwd_h, intra_A again: b, h and A are recomputed from the saved inputs (fla's
            chunk kernels recompute h too), so autograd keeps only q, k, v, g and the initial state
            bwd_dh   reverse walk: dh_c (gradient of the state leaving chunk c) and d initial_state
            bwd_dv   dv = scale A^T do + (k exp(b_L - b)) dh_c   (per-key A^T do with fp32 A)
            dA, intra_dqk  (per-key gates) the A-part of dq, dk in the same sub-block scheme
            bwd_dqk  dq, dk, and dg = reverse-cumsum(q.dq - k.dk) + (last-row terms of b_L)
Every sequence (batch row, or document with cu_seqlens) is chunked on its own via host-built chunk
tables (layout.py), so a chunk never spans a document boundary; rows past a chunk's length are
masked. The walk state and every accumulation are fp32; h / dh are stored in the inputs' dtype
(bf16 / fp16 feed the tensor-core dots as that anyway) and in fp32 for fp32 inputs.

Launch grids (`grids`) keep the unbounded counts - chunks, and sequences x heads - in grid dimension
x (limit 2^31 - 1); y and z hold heads and K/V/sub-block counts (CUDA caps them at 65535), so any
length and any number of documents launch. BK / BV (16..128), num_warps and num_stages are autotuned
per (H, K, V, gate, dtypes) (gla_triton_fwd.autotune); the interpreter uses one fixed config.
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
GRID_MAX = (2 ** 31 - 1, 65535, 65535)   # CUDA's grid limits (x, y, z)


def _block(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


def grids(nchunks: int, nseq: int, H: int, K: int, V: int) -> dict:
    """Launch grid of every kernel as a function of its meta-parameters (BK, BV, GATE), for a call
    with `nchunks` chunks and `nseq` sequences (batch rows or documents)."""
    NC, NS = nchunks, BT // BC
    nk = lambda m: triton.cdiv(K, m["BK"])
    nv = lambda m: triton.cdiv(V, m["BV"])
    return {
        "cumsum": lambda m: (NC, H, nk(m) if m["GATE"] == 2 else 1),
        "fwd_h": lambda m: (nseq * H, nk(m), nv(m)),
        "intra_A": lambda m: (NC, NS * NS, H),
        "fwd_o": lambda m: (NC, nv(m), H),
        "bwd_dh": lambda m: (nseq * H, nk(m), nv(m)),
        "bwd_dv": lambda m: (NC, nv(m), H),
        "dA": lambda m: (NC, H),
        "intra_dqk": lambda m: (NC * NS, nk(m), H),
        "bwd_dqk": lambda m: (NC, nk(m), H),
    }


# Every launch goes through _launch, so a test can record the launch configurations (and, with
# run=False, skip the kernels): lctrain.kernels.testing.record_launches.
_RECORD: Optional[list] = None
_RUN = True


def _launch(kernel, grid, *args, **meta):
    if _RECORD is not None:
        _RECORD.append((kernel, grid, args, meta))
    if _RUN:
        kernel[grid](*args, **meta)


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


def _states(q, k, v, g, s0, tab, gate: int, want_final: bool):
    """Forward prologue, run by the forward and again by the backward: b (gate cumsum, fp32), h (the
    state entering every chunk), the final states when asked, and A (per-key-gate scores, fp32)."""
    TOT, H, K = q.shape
    V = v.shape[-1]
    NC, N = tab.nchunks, tab.nseq
    G = grids(NC, N, H, K, V)
    prec, f32 = _prec(q), dict(device=q.device, dtype=torch.float32)
    b = A = None
    h = torch.empty(NC, H, K, V, device=q.device, dtype=q.dtype if q.element_size() < 4 else torch.float32)
    dummy = h
    if gate:
        b = torch.empty(g.shape, **f32)
        if NC:
            _launch(_cumsum_kernel, G["cumsum"], g, b, tab.start, tab.len, H, K, BT, BK=_block(K, 128),
                    GATE=gate)
    final = torch.empty(N, H, K, V, **f32) if want_final else None
    _launch(_fwd_h_kernel, G["fwd_h"], k, v, b if gate else dummy, h, s0 if s0 is not None else dummy,
            final if want_final else dummy, tab.seq_chunk0, tab.seq_nchunks, tab.start, tab.len, H, K, V,
            BT, GATE=gate, HAS_S0=s0 is not None, STORE_ST=want_final, PREC=prec)
    if gate == 2:
        A = torch.empty(TOT, H, BT, **f32)
        if NC:
            _launch(_intra_A_kernel, G["intra_A"], q, k, b, A, tab.start, tab.len, H, K, BT, BC,
                    NS=BT // BC, PREC=prec)
    return b, h, final, A


class _ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, want_final, tab):
        TOT, H, K = q.shape
        V = v.shape[-1]
        gate = 0 if g is None else (1 if g.dim() == 2 else 2)
        b, h, final, A = _states(q, k, v, g, s0, tab, gate, want_final)
        o = torch.empty(TOT, H, V, device=q.device, dtype=v.dtype)
        if tab.nchunks:
            _launch(_fwd_o_kernel, grids(tab.nchunks, tab.nseq, H, K, V)["fwd_o"], q, k, v,
                    b if gate else h, h, A if gate == 2 else h, o, tab.start, tab.len, scale, H, K, V, BT,
                    GATE=gate, PREC=_prec(q))
        ctx.save_for_backward(q, k, v, g, s0)      # b, h, A are recomputed in the backward
        ctx.gate, ctx.scale, ctx.tab = gate, scale, tab
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, s0 = ctx.saved_tensors
        gate, scale, tab = ctx.gate, ctx.scale, ctx.tab
        TOT, H, K = q.shape
        V = v.shape[-1]
        NC, N = tab.nchunks, tab.nseq
        G = grids(NC, N, H, K, V)
        prec, dev = _prec(q), q.device
        f32 = dict(device=dev, dtype=torch.float32)
        b, h, _, A = _states(q, k, v, g, s0, tab, gate, False)
        do = do.contiguous()
        dummy = h
        dh = torch.empty_like(h)
        ds0 = torch.empty(N, H, K, V, **f32) if s0 is not None else None
        dfinal = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        _launch(_bwd_dh_kernel, G["bwd_dh"], q, do, b if gate else dummy, dh,
                dfinal if dfinal is not None else dummy, ds0 if ds0 is not None else dummy, tab.seq_chunk0,
                tab.seq_nchunks, tab.start, tab.len, scale, H, K, V, BT, GATE=gate,
                HAS_DST=dfinal is not None, STORE_DS0=ds0 is not None, PREC=prec)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv = torch.empty_like(v)
        dg = None
        if NC:
            _launch(_bwd_dv_kernel, G["bwd_dv"], q, k, b if gate else dummy, A if gate == 2 else dummy, do, dh,
                    dv, tab.start, tab.len, scale, H, K, V, BT, GATE=gate, PREC=prec)
            dqa = dka = dummy
            if gate == 2:
                dA = torch.empty(TOT, H, BT, **f32)
                _launch(_dA_kernel, G["dA"], v, do, dA, tab.start, tab.len, scale, H, V, BT, PREC=prec)
                dqa, dka = torch.empty(TOT, H, K, **f32), torch.empty(TOT, H, K, **f32)
                _launch(_intra_dqk_kernel, G["intra_dqk"], q, k, b, dA, dqa, dka, tab.start, tab.len, H, K,
                        BT, BC, NS=BT // BC, PREC=prec)
                del dA
            # BK is fixed here (not tuned): per-head dg is a deterministic sum of one partial per K block
            BK = _block(K, 64)
            dgp = None
            if gate == 1:
                dgp = torch.empty(triton.cdiv(K, BK), TOT, H, **f32)
            elif gate == 2:
                dgp = torch.empty(TOT, H, K, **f32)
            _launch(_bwd_dqk_kernel, G["bwd_dqk"], q, k, v, b if gate else dummy, h, dh, do, dqa, dka, dq, dk,
                    dgp if gate else dummy, tab.start, tab.len, scale, TOT, H, K, V, BT, BK=BK, GATE=gate,
                    PREC=prec)
            if gate:
                dg = (dgp.sum(0) if gate == 1 else dgp).to(g.dtype)
        elif gate:
            dg = torch.zeros(g.shape, device=dev, dtype=g.dtype)
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
