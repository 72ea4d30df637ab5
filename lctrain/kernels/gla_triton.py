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
import triton.language as tl
from torch import Tensor

from lctrain.kernels.layout import build_layout

BT = 64   # chunk
BC = 16   # sub-block of the per-key-dim intra-chunk scores


@triton.jit
def _rows(ptr, t0, n, col0, H: tl.constexpr, D: tl.constexpr, i_h, R: tl.constexpr, BD: tl.constexpr):
    """Tile [R, BD] of a [tokens, H, D] tensor: rows t0 .. t0+R (valid below n), columns col0 ..; 0 outside."""
    r = tl.arange(0, R)
    c = col0 + tl.arange(0, BD)
    p = ptr + ((t0 + r)[:, None] * H + i_h) * D + c[None, :]
    return tl.load(p, mask=(r[:, None] < n) & (c[None, :] < D), other=0.0)


@triton.jit
def _row(ptr, t, col0, H: tl.constexpr, D: tl.constexpr, i_h, BD: tl.constexpr):
    """Row t ([BD]) of a [tokens, H, D] tensor (t must be a valid token)."""
    c = col0 + tl.arange(0, BD)
    return tl.load(ptr + (t * H + i_h) * D + c, mask=c < D, other=0.0)


@triton.jit
def _row_if(ptr, t, valid, col0, H: tl.constexpr, D: tl.constexpr, i_h, BD: tl.constexpr):
    """Row t, or zeros when not valid (never reads past a chunk)."""
    c = col0 + tl.arange(0, BD)
    return tl.load(ptr + (t * H + i_h) * D + c, mask=(c < D) & valid, other=0.0)


@triton.jit
def _state_ptrs(ptr, idx, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, i_k, i_v,
                BK: tl.constexpr, BV: tl.constexpr):
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    p = ptr + ((idx * H + i_h) * K + ck[:, None]).to(tl.int64) * V + cv[None, :]
    return p, (ck[:, None] < K) & (cv[None, :] < V)


@triton.jit
def _cumsum_kernel(g, b, chunk_start, chunk_len, H: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr):
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    r = tl.arange(0, BT)
    if GATE == 1:
        x = tl.load(g + (t0 + r) * H + i_h, mask=r < n, other=0.0).to(tl.float32)
        tl.store(b + (t0 + r) * H + i_h, tl.cumsum(x, axis=0), mask=r < n)
    else:
        c = i_k * BK + tl.arange(0, BK)
        x = _rows(g, t0, n, i_k * BK, H, K, i_h, BT, BK).to(tl.float32)
        p = b + ((t0 + r)[:, None] * H + i_h) * K + c[None, :]
        tl.store(p, tl.cumsum(x, axis=0), mask=(r[:, None] < n) & (c[None, :] < K))


@triton.jit
def _fwd_h_kernel(k, v, b, h, s0, sT, seq_chunk0, seq_nchunks, chunk_start, chunk_len,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr,
                  STORE_ST: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    c0 = tl.load(seq_chunk0 + i_n)
    nc = tl.load(seq_nchunks + i_n)
    r = tl.arange(0, BT)
    p_s, m_s = _state_ptrs(s0, i_n, i_h, H, K, V, i_k, i_v, BK, BV)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        state = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    for i in range(0, nc):
        c = c0 + i
        t0 = tl.load(chunk_start + c).to(tl.int64)
        n = tl.load(chunk_len + c)
        p_h, m_h = _state_ptrs(h, c, i_h, H, K, V, i_k, i_v, BK, BV)
        tl.store(p_h, state, mask=m_h)
        kt = _rows(k, t0, n, i_k * BK, H, K, i_h, BT, BK).to(tl.float32)
        vt = _rows(v, t0, n, i_v * BV, H, V, i_h, BT, BV)
        if GATE == 1:
            bt = tl.load(b + (t0 + r) * H + i_h, mask=r < n, other=0.0)
            bl = tl.load(b + (t0 + n - 1) * H + i_h)
            kt = kt * tl.exp(tl.where(r < n, bl - bt, 0.0))[:, None]
            state = state * tl.exp(bl)
        if GATE == 2:
            bt = _rows(b, t0, n, i_k * BK, H, K, i_h, BT, BK)
            bl = _row(b, t0 + n - 1, i_k * BK, H, K, i_h, BK)
            kt = kt * tl.exp(tl.where((r < n)[:, None], bl[None, :] - bt, 0.0))
            state = state * tl.exp(bl)[:, None]
        state += tl.dot(tl.trans(kt.to(vt.dtype)), vt, input_precision=PREC)
    if STORE_ST:
        p_t, m_t = _state_ptrs(sT, i_n, i_h, H, K, V, i_k, i_v, BK, BV)
        tl.store(p_t, state, mask=m_t)


@triton.jit
def _intra_A_kernel(q, k, b, A, chunk_start, chunk_len, H: tl.constexpr, K: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NS: tl.constexpr,
                    PREC: tl.constexpr):
    """Per-key-dim gates: the causal scores A (unscaled) of one 16x16 sub-block (I, J), J <= I."""
    i_c, i_blk, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_blk // NS, i_blk % NS
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    if (i_i < i_j) | (i_i * BC >= n):      # upper blocks are never read (consumers mask them)
        return
    ri = tl.arange(0, BC)
    mi = i_i * BC + ri < n
    mj = i_j * BC + ri < n
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        qi = _rows(q, t0 + i_i * BC, n - i_i * BC, kb * BK, H, K, i_h, BC, BK).to(tl.float32)
        bi = _rows(b, t0 + i_i * BC, n - i_i * BC, kb * BK, H, K, i_h, BC, BK)
        if i_i > i_j:   # every row of J precedes every row of I: split the decay at I's first row
            bref = _row(b, t0 + i_i * BC, kb * BK, H, K, i_h, BK)
            kj = _rows(k, t0 + i_j * BC, n - i_j * BC, kb * BK, H, K, i_h, BC, BK).to(tl.float32)
            bj = _rows(b, t0 + i_j * BC, n - i_j * BC, kb * BK, H, K, i_h, BC, BK)
            qg = qi * tl.exp(tl.where(mi[:, None], bi - bref[None, :], 0.0))
            kg = kj * tl.exp(tl.where(mj[:, None], bref[None, :] - bj, 0.0))
            acc += tl.dot(qg, tl.trans(kg), input_precision=PREC)
        else:           # diagonal block: exact decay per (i, j) pair, one column at a time
            for jj in range(0, BC):
                ok = i_j * BC + jj < n
                kj = _row_if(k, t0 + i_j * BC + jj, ok, kb * BK, H, K, i_h, BK).to(tl.float32)
                bj = _row_if(b, t0 + i_j * BC + jj, ok, kb * BK, H, K, i_h, BK)
                m = (ri >= jj) & mi & (i_j * BC + jj < n)
                e = tl.exp(tl.where(m[:, None], bi - bj[None, :], 0.0))
                col = tl.sum(tl.where(m[:, None], qi * kj[None, :] * e, 0.0), axis=1)
                acc += tl.where(ri[None, :] == jj, col[:, None], 0.0)
    p = A + ((t0 + i_i * BC + ri)[:, None] * H + i_h) * BT + i_j * BC + ri[None, :]
    tl.store(p, acc, mask=mi[:, None])


@triton.jit
def _scores(q, k, b, A, t0, n, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    """Causal intra-chunk scores [BT, BT] (unscaled, fp32), zero outside i >= j < n."""
    r = tl.arange(0, BT)
    causal = (r[:, None] >= r[None, :]) & (r[:, None] < n)
    if GATE == 2:
        s = tl.load(A + ((t0 + r)[:, None] * H + i_h) * BT + r[None, :], mask=causal, other=0.0)
    else:
        s = tl.zeros([BT, BT], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            qt = _rows(q, t0, n, kb * BK, H, K, i_h, BT, BK)
            kt = _rows(k, t0, n, kb * BK, H, K, i_h, BT, BK)
            s += tl.dot(qt, tl.trans(kt), input_precision=PREC)
        if GATE == 1:
            bt = tl.load(b + (t0 + r) * H + i_h, mask=r < n, other=0.0)
            s = s * tl.exp(tl.where(causal, bt[:, None] - bt[None, :], 0.0))
        s = tl.where(causal, s, 0.0)
    return s


@triton.jit
def _fwd_o_kernel(q, k, v, b, h, A, o, chunk_start, chunk_len, scale, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    r = tl.arange(0, BT)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        qt = _rows(q, t0, n, kb * BK, H, K, i_h, BT, BK)
        p_h, m_h = _state_ptrs(h, i_c, i_h, H, K, V, kb, i_v, BK, BV)
        ht = tl.load(p_h, mask=m_h, other=0.0)
        if GATE == 1:
            bt = tl.load(b + (t0 + r) * H + i_h, mask=r < n, other=0.0)
            qt = (qt * tl.exp(bt)[:, None]).to(qt.dtype)
        if GATE == 2:
            qt = (qt * tl.exp(_rows(b, t0, n, kb * BK, H, K, i_h, BT, BK))).to(qt.dtype)
        acc += tl.dot(qt, ht.to(qt.dtype), input_precision=PREC)
    vt = _rows(v, t0, n, i_v * BV, H, V, i_h, BT, BV)
    s = _scores(q, k, b, A, t0, n, i_h, H, K, BT, BK, GATE, PREC)
    acc += tl.dot(s.to(vt.dtype), vt, input_precision=PREC)
    cv = i_v * BV + tl.arange(0, BV)
    p = o + ((t0 + r)[:, None] * H + i_h) * V + cv[None, :]
    tl.store(p, (acc * scale).to(o.dtype.element_ty), mask=(r[:, None] < n) & (cv[None, :] < V))


@triton.jit
def _bwd_dh_kernel(q, do, b, dh, dsT, ds0, seq_chunk0, seq_nchunks, chunk_start, chunk_len, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DST: tl.constexpr,
                   STORE_DS0: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    c0 = tl.load(seq_chunk0 + i_n)
    nc = tl.load(seq_nchunks + i_n)
    r = tl.arange(0, BT)
    p_s, m_s = _state_ptrs(dsT, i_n, i_h, H, K, V, i_k, i_v, BK, BV)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DST:
        state = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    for i in range(0, nc):
        c = c0 + nc - 1 - i
        t0 = tl.load(chunk_start + c).to(tl.int64)
        n = tl.load(chunk_len + c)
        p_h, m_h = _state_ptrs(dh, c, i_h, H, K, V, i_k, i_v, BK, BV)
        tl.store(p_h, state, mask=m_h)
        qt = _rows(q, t0, n, i_k * BK, H, K, i_h, BT, BK).to(tl.float32)
        dot = _rows(do, t0, n, i_v * BV, H, V, i_h, BT, BV)
        if GATE == 1:
            bt = tl.load(b + (t0 + r) * H + i_h, mask=r < n, other=0.0)
            bl = tl.load(b + (t0 + n - 1) * H + i_h)
            qt = qt * tl.exp(bt)[:, None]
            state = state * tl.exp(bl)
        if GATE == 2:
            qt = qt * tl.exp(_rows(b, t0, n, i_k * BK, H, K, i_h, BT, BK))
            state = state * tl.exp(_row(b, t0 + n - 1, i_k * BK, H, K, i_h, BK))[:, None]
        state += scale * tl.dot(tl.trans(qt.to(dot.dtype)), dot, input_precision=PREC)
    if STORE_DS0:
        p_0, m_0 = _state_ptrs(ds0, i_n, i_h, H, K, V, i_k, i_v, BK, BV)
        tl.store(p_0, state, mask=m_0)


@triton.jit
def _bwd_dv_kernel(q, k, b, A, do, dh, dv, chunk_start, chunk_len, scale, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    r = tl.arange(0, BT)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        kt = _rows(k, t0, n, kb * BK, H, K, i_h, BT, BK)
        p_h, m_h = _state_ptrs(dh, i_c, i_h, H, K, V, kb, i_v, BK, BV)
        dht = tl.load(p_h, mask=m_h, other=0.0)
        if GATE == 1:
            bt = tl.load(b + (t0 + r) * H + i_h, mask=r < n, other=0.0)
            bl = tl.load(b + (t0 + n - 1) * H + i_h)
            kt = (kt * tl.exp(tl.where(r < n, bl - bt, 0.0))[:, None]).to(kt.dtype)
        if GATE == 2:
            bt = _rows(b, t0, n, kb * BK, H, K, i_h, BT, BK)
            bl = _row(b, t0 + n - 1, kb * BK, H, K, i_h, BK)
            kt = (kt * tl.exp(tl.where((r < n)[:, None], bl[None, :] - bt, 0.0))).to(kt.dtype)
        acc += tl.dot(kt, dht.to(kt.dtype), input_precision=PREC)
    dot = _rows(do, t0, n, i_v * BV, H, V, i_h, BT, BV)
    s = _scores(q, k, b, A, t0, n, i_h, H, K, BT, BK, GATE, PREC)
    acc += scale * tl.dot(tl.trans(s.to(dot.dtype)), dot, input_precision=PREC)
    cv = i_v * BV + tl.arange(0, BV)
    p = dv + ((t0 + r)[:, None] * H + i_h) * V + cv[None, :]
    tl.store(p, acc.to(dv.dtype.element_ty), mask=(r[:, None] < n) & (cv[None, :] < V))


@triton.jit
def _dA_kernel(v, do, dA, chunk_start, chunk_len, scale, H: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per-key-dim gates: dA = scale do v^T on the causal pairs."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    r = tl.arange(0, BT)
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        dot = _rows(do, t0, n, vb * BV, H, V, i_h, BT, BV)
        vt = _rows(v, t0, n, vb * BV, H, V, i_h, BT, BV)
        acc += tl.dot(dot, tl.trans(vt), input_precision=PREC)
    causal = (r[:, None] >= r[None, :]) & (r[:, None] < n)
    p = dA + ((t0 + r)[:, None] * H + i_h) * BT + r[None, :]
    tl.store(p, tl.where(causal, acc * scale, 0.0), mask=(r[:, None] < n))


@triton.jit
def _intra_dqk_kernel(q, k, b, dA, dq, dk, chunk_start, chunk_len, H: tl.constexpr,
                      K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      NS: tl.constexpr, PREC: tl.constexpr):
    """Per-key-dim gates: dq_i = sum_{j<=i} dA_ij k_j e^(b_i-b_j), dk_j = sum_{i>=j} dA_ij q_i e^(b_i-b_j)
    for the rows of sub-block I (fp32, the A-part only)."""
    i_k, i_ci, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_i = i_ci // NS, i_ci % NS
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    if i_i * BC >= n:
        return
    ri = tl.arange(0, BC)
    ti = t0 + i_i * BC
    ni = n - i_i * BC                                    # valid rows from this block on
    mi = ri < ni
    qi = _rows(q, ti, ni, i_k * BK, H, K, i_h, BC, BK).to(tl.float32)
    ki = _rows(k, ti, ni, i_k * BK, H, K, i_h, BC, BK).to(tl.float32)
    bi = _rows(b, ti, ni, i_k * BK, H, K, i_h, BC, BK)
    p_dA = dA + ((ti + ri) * H + i_h) * BT                 # [BC]: row starts of dA for block I
    dqi = tl.zeros([BC, BK], dtype=tl.float32)
    # dq: earlier sub-blocks, decay split at this block's first row
    bref = _row(b, ti, i_k * BK, H, K, i_h, BK)
    for jb in range(0, i_i):
        tj = t0 + jb * BC
        kj = _rows(k, tj, BC, i_k * BK, H, K, i_h, BC, BK).to(tl.float32)
        bj = _rows(b, tj, BC, i_k * BK, H, K, i_h, BC, BK)
        da = tl.load(p_dA[:, None] + jb * BC + ri[None, :], mask=mi[:, None], other=0.0)
        dqi += tl.dot(da, kj * tl.exp(bref[None, :] - bj), input_precision=PREC)
    dqi = dqi * tl.exp(tl.where(mi[:, None], bi - bref[None, :], 0.0))
    # dk: later sub-blocks, decay split at this block's last valid row
    last = tl.minimum(ni, BC) - 1
    bref = _row(b, ti + last, i_k * BK, H, K, i_h, BK)
    dki = tl.zeros([BC, BK], dtype=tl.float32)
    for ib in range(i_i + 1, tl.cdiv(n, BC)):
        tj = t0 + ib * BC
        nj = n - ib * BC
        mj = ri < nj
        qj = _rows(q, tj, nj, i_k * BK, H, K, i_h, BC, BK).to(tl.float32)
        bj = _rows(b, tj, nj, i_k * BK, H, K, i_h, BC, BK)
        p = dA + ((tj + ri)[:, None] * H + i_h) * BT + i_i * BC + ri[None, :]
        da = tl.load(p, mask=mj[:, None], other=0.0)                       # rows of ib, cols of I
        qg = qj * tl.exp(tl.where(mj[:, None], bj - bref[None, :], 0.0))
        dki += tl.dot(tl.trans(da), qg, input_precision=PREC)
    dki = dki * tl.exp(tl.where(mi[:, None], bref[None, :] - bi, 0.0))
    # the diagonal sub-block, pair by pair
    for jj in range(0, BC):
        valid = jj < ni
        kj = _row_if(k, ti + jj, valid, i_k * BK, H, K, i_h, BK).to(tl.float32)
        qj = _row_if(q, ti + jj, valid, i_k * BK, H, K, i_h, BK).to(tl.float32)
        bj = _row_if(b, ti + jj, valid, i_k * BK, H, K, i_h, BK)
        col = tl.load(p_dA + i_i * BC + jj, mask=mi & valid, other=0.0)      # dA[i, jj], i in I
        m = (ri >= jj) & mi & valid
        dqi += tl.where(m[:, None], col[:, None] * kj[None, :] * tl.exp(tl.where(m[:, None], bi - bj[None, :], 0.0)), 0.0)
        rowv = tl.load(dA + ((ti + jj) * H + i_h) * BT + i_i * BC + ri, mask=(ri <= jj) & valid, other=0.0)
        # dk_i (i <= jj) += dA[jj, i] q_jj e^(b_jj - b_i)
        m2 = (ri <= jj) & valid & mi
        dki += tl.where(m2[:, None], rowv[:, None] * qj[None, :] * tl.exp(tl.where(m2[:, None], bj[None, :] - bi, 0.0)), 0.0)
    ck = i_k * BK + tl.arange(0, BK)
    p_out = ((ti + ri)[:, None] * H + i_h) * K + ck[None, :]
    m_out = mi[:, None] & (ck[None, :] < K)
    tl.store(dq + p_out, dqi, mask=m_out)
    tl.store(dk + p_out, dki, mask=m_out)


@triton.jit
def _bwd_dqk_kernel(q, k, v, b, h, dh, do, dqa, dka, dq, dk, dg, chunk_start, chunk_len, scale, TOT,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    """dq, dk (inter-chunk parts + intra) and dg for one K block of one chunk.

    With b_i the in-chunk cumsum, every use of b is exp(+b_i) on q or exp(-b_j) on k inside a product,
    so dL/db = q.dq - k.dk, plus the last row's own terms (k exp(b_L - b) and exp(b_L) h_c);
    dg is its reverse cumsum. Per-head gates write one partial dg per K block (summed on the host).
    """
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    r = tl.arange(0, BT)
    m = r < n
    causal = (r[:, None] >= r[None, :]) & m[:, None]
    dq_h = tl.zeros([BT, BK], dtype=tl.float32)          # do h_c^T
    dk_h = tl.zeros([BT, BK], dtype=tl.float32)          # v dh_c^T
    ds = tl.zeros([BT, BT], dtype=tl.float32)            # do v^T
    hdh = tl.zeros([BK], dtype=tl.float32)               # rowsum(h_c * dh_c)
    for vb in range(0, tl.cdiv(V, BV)):
        vt = _rows(v, t0, n, vb * BV, H, V, i_h, BT, BV)
        dot = _rows(do, t0, n, vb * BV, H, V, i_h, BT, BV)
        p_h, m_h = _state_ptrs(h, i_c, i_h, H, K, V, i_k, vb, BK, BV)
        p_dh, _ = _state_ptrs(dh, i_c, i_h, H, K, V, i_k, vb, BK, BV)
        ht = tl.load(p_h, mask=m_h, other=0.0)
        dht = tl.load(p_dh, mask=m_h, other=0.0)
        dq_h += tl.dot(dot, tl.trans(ht.to(dot.dtype)), input_precision=PREC)
        dk_h += tl.dot(vt, tl.trans(dht.to(vt.dtype)), input_precision=PREC)
        if GATE < 2:
            ds += tl.dot(dot, tl.trans(vt), input_precision=PREC)
        if GATE > 0:
            hdh += tl.sum(ht * dht, axis=1)
    qt = _rows(q, t0, n, i_k * BK, H, K, i_h, BT, BK)
    kt = _rows(k, t0, n, i_k * BK, H, K, i_h, BT, BK)
    ck = i_k * BK + tl.arange(0, BK)
    p_out = ((t0 + r)[:, None] * H + i_h) * K + ck[None, :]
    m_out = m[:, None] & (ck[None, :] < K)
    if GATE == 0:
        ds = tl.where(causal, ds * scale, 0.0).to(qt.dtype)
        dqt = dq_h * scale + tl.dot(ds, kt, input_precision=PREC)
        dkt = dk_h + tl.dot(tl.trans(ds), qt, input_precision=PREC)
    if GATE == 1:
        bt = tl.load(b + (t0 + r) * H + i_h, mask=m, other=0.0)
        bl = tl.load(b + (t0 + n - 1) * H + i_h)
        ds = tl.where(causal, ds * scale * tl.exp(tl.where(causal, bt[:, None] - bt[None, :], 0.0)), 0.0)
        ds = ds.to(qt.dtype)
        dk_h = dk_h * tl.exp(tl.where(m, bl - bt, 0.0))[:, None]
        dqt = dq_h * scale * tl.exp(bt)[:, None] + tl.dot(ds, kt, input_precision=PREC)
        dkt = dk_h + tl.dot(tl.trans(ds), qt, input_precision=PREC)
        db = tl.sum(qt.to(tl.float32) * dqt - kt.to(tl.float32) * dkt, axis=1)
        extra = tl.sum(tl.sum(kt.to(tl.float32) * dk_h, axis=1), axis=0) + tl.exp(bl) * tl.sum(hdh, axis=0)
        dgt = tl.cumsum(db, axis=0, reverse=True) + extra
        tl.store(dg + i_k.to(tl.int64) * TOT * H + (t0 + r) * H + i_h, dgt, mask=m)   # partial over K blocks
    if GATE == 2:
        bt = _rows(b, t0, n, i_k * BK, H, K, i_h, BT, BK)
        bl = _row(b, t0 + n - 1, i_k * BK, H, K, i_h, BK)
        dk_h = dk_h * tl.exp(tl.where(m[:, None], bl[None, :] - bt, 0.0))
        dqt = dq_h * scale * tl.exp(bt) + tl.load(dqa + p_out, mask=m_out, other=0.0)
        dkt = dk_h + tl.load(dka + p_out, mask=m_out, other=0.0)
        db = qt.to(tl.float32) * dqt - kt.to(tl.float32) * dkt
        extra = tl.sum(kt.to(tl.float32) * dk_h, axis=0) + tl.exp(bl) * hdh
        dgt = tl.cumsum(db, axis=0, reverse=True) + extra[None, :]
        tl.store(dg + p_out, dgt, mask=m_out)
    tl.store(dq + p_out, dqt.to(dq.dtype.element_ty), mask=m_out)
    tl.store(dk + p_out, dkt.to(dk.dtype.element_ty), mask=m_out)


# ----------------------------------------------------------------------------------------------
# host side

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
