"""Triton kernels of the chunked GLA forward (and the tile helpers and tuning configs the backward
shares). The work split, the math and the launch grids are described in gla_triton.py."""
import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 every kernel uses one fixed config (autotuning there would time numpy).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCKS = (16, 32, 64, 128)      # every BK / BV a config may ask for (after clamping to the head dims)


def configs(blocks, fixed: dict):
    """Autotune configs: `blocks` is a list of (BK, BV, num_warps, num_stages); a None block size is
    not tuned (the host passes it). `fixed` is the one config of the interpreter."""
    def cfg(bk, bv, w, s):
        kw = {n: x for n, x in (("BK", bk), ("BV", bv)) if x is not None}
        return triton.Config(kw, num_warps=w, num_stages=s)
    if INTERPRET:   # only the block sizes this family tunes
        bk, bv = (fixed[n] if x is not None else None for n, x in zip(("BK", "BV"), blocks[0][:2]))
        return [cfg(bk, bv, 4, 1)]
    return [cfg(*b) for b in blocks]


def clamp_configs(cfgs, nargs, **kwargs):
    """early_config_prune: block sizes above the (power-of-two) head dims only add masked lanes. Keep
    the configs whose blocks fit max(16, next_pow2(K)) x (V); if none does (small head dims), the
    first config clamped to them: small heads get one config, not a search over warps/stages."""
    kp = max(16, triton.next_power_of_2(nargs.get("K", kwargs.get("K", 16))))
    vp = max(16, triton.next_power_of_2(nargs.get("V", kwargs.get("V", 16))))
    fit = [c for c in cfgs if c.kwargs.get("BK", 0) <= kp and c.kwargs.get("BV", 0) <= vp]
    if fit:
        return fit
    kw = dict(cfgs[0].kwargs)
    kw.update({n: min(kw[n], cap) for n, cap in (("BK", kp), ("BV", vp)) if n in kw})
    return [triton.Config(kw, num_warps=cfgs[0].num_warps, num_stages=cfgs[0].num_stages)]


def autotune(blocks, fixed, key=("H", "K", "V", "GATE")):
    """triton.autotune keyed on the head shapes, the gate kind (and, by triton, the tensors' dtypes)."""
    return triton.autotune(configs=configs(blocks, fixed), key=list(key),
                           prune_configs_by={"early_config_prune": clamp_configs})


# (BK, BV, num_warps, num_stages) candidates, few on purpose: each one is a compile on first use
WALK = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (32, 64, 2, 3)]
PER_V = [(64, 64, 4, 2), (128, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 8, 3)]
PER_K = [(32, None, 2, 2), (64, None, 4, 2), (64, None, 4, 3), (128, None, 8, 2)]
LOOP_V = [(None, 64, 4, 2), (None, 128, 8, 2), (None, 64, 4, 3), (None, 32, 2, 2)]
FIXED = {"BK": 64, "BV": 64}


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
def _row_if(ptr, t, j, n, col0, H: tl.constexpr, D: tl.constexpr, i_h, BD: tl.constexpr):
    """Row t when j < n, else zeros (never reads past a chunk). The condition is folded into the
    column bound: a scalar bool in a load mask is rejected by triton >= 3.9's interpreter."""
    c = col0 + tl.arange(0, BD)
    return tl.load(ptr + (t * H + i_h) * D + c, mask=c < tl.where(j < n, D, 0), other=0.0)


@triton.jit
def _state_ptrs(ptr, idx, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, i_k, i_v,
                BK: tl.constexpr, BV: tl.constexpr):
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    p = ptr + ((idx.to(tl.int64) * H + i_h) * K + ck[:, None]) * V + cv[None, :]   # > 2^31 at 1M docs
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


@autotune(WALK, FIXED)
@triton.jit
def _fwd_h_kernel(k, v, b, h, s0, sT, seq_chunk0, seq_nchunks, chunk_start, chunk_len,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr,
                  STORE_ST: tl.constexpr, PREC: tl.constexpr):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        tl.store(p_h, state.to(h.dtype.element_ty), mask=m_h)
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


@autotune(PER_K, FIXED, key=("H", "K"))
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
                kj = _row_if(k, t0 + i_j * BC + jj, i_j * BC + jj, n, kb * BK, H, K, i_h, BK).to(tl.float32)
                bj = _row_if(b, t0 + i_j * BC + jj, i_j * BC + jj, n, kb * BK, H, K, i_h, BK)
                m = (ri >= jj) & (i_i * BC + ri < n) & (ri * 0 + i_j * BC + jj < n)
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


@autotune(PER_V, FIXED)
@triton.jit
def _fwd_o_kernel(q, k, v, b, h, A, o, chunk_start, chunk_len, scale, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
