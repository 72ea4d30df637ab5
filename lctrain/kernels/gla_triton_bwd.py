"""Triton kernels of the chunked GLA backward (work split and math: gla_triton.py)."""
import triton
import triton.language as tl

from lctrain.kernels.gla_triton_fwd import (FIXED, LOOP_V, PER_K, PER_V, WALK, _row, _row_if, _rows, _scores,
                                            _state_ptrs, autotune)


@autotune(WALK, FIXED)
@triton.jit
def _bwd_dh_kernel(q, do, b, dh, dsT, ds0, seq_chunk0, seq_nchunks, chunk_start, chunk_len, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_DST: tl.constexpr,
                   STORE_DS0: tl.constexpr, PREC: tl.constexpr):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        tl.store(p_h, state.to(dh.dtype.element_ty), mask=m_h)
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


@autotune(PER_V, FIXED)
@triton.jit
def _bwd_dv_kernel(q, k, b, A, do, dh, dv, chunk_start, chunk_len, scale, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    if GATE == 2:   # per-key scores carry the decay: keep them fp32 (fla does too)
        acc += scale * tl.dot(tl.trans(s), dot.to(tl.float32), input_precision=PREC)
    else:
        acc += scale * tl.dot(tl.trans(s.to(dot.dtype)), dot, input_precision=PREC)
    cv = i_v * BV + tl.arange(0, BV)
    p = dv + ((t0 + r)[:, None] * H + i_h) * V + cv[None, :]
    tl.store(p, acc.to(dv.dtype.element_ty), mask=(r[:, None] < n) & (cv[None, :] < V))


@autotune(LOOP_V, FIXED, key=("H", "V"))
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


@autotune(PER_K, FIXED, key=("H", "K"))
@triton.jit
def _intra_dqk_kernel(q, k, b, dA, dq, dk, chunk_start, chunk_len, H: tl.constexpr,
                      K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      NS: tl.constexpr, PREC: tl.constexpr):
    """Per-key-dim gates: dq_i = sum_{j<=i} dA_ij k_j e^(b_i-b_j), dk_j = sum_{i>=j} dA_ij q_i e^(b_i-b_j)
    for the rows of sub-block I (fp32, the A-part only)."""
    i_ci, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_i = i_ci // NS, i_ci % NS
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    if i_i * BC >= n:
        return
    ri = tl.arange(0, BC)
    ti = t0 + i_i * BC
    ni = n - i_i * BC                                    # valid rows from this block on
    mi = ri < ni
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
        valid = ri * 0 + jj < ni                            # [BC]: row jj exists (a tensor, see _row_if)
        kj = _row_if(k, ti + jj, jj, ni, i_k * BK, H, K, i_h, BK).to(tl.float32)
        qj = _row_if(q, ti + jj, jj, ni, i_k * BK, H, K, i_h, BK).to(tl.float32)
        bj = _row_if(b, ti + jj, jj, ni, i_k * BK, H, K, i_h, BK)
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


@autotune(LOOP_V, FIXED)
@triton.jit
def _bwd_dqk_kernel(q, k, v, b, h, dh, do, dqa, dka, dq, dk, dg, chunk_start, chunk_len, scale, TOT,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    """dq, dk (inter-chunk parts + intra) and dg for one K block of one chunk.

    With b_i the in-chunk cumsum, every use of b is exp(+b_i) on q or exp(-b_j) on k inside a product,
    so dL/db = q.dq - k.dk, plus the last row's own terms (k exp(b_L - b) and exp(b_L) h_c);
    dg is its reverse cumsum. Per-head gates write one partial dg per K block (summed on the host).
    """
    i_c, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
            hdh += tl.sum(ht.to(tl.float32) * dht.to(tl.float32), axis=1)
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
