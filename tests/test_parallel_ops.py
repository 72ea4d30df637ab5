"""Sequence-parallel ops vs the single-process ops on the full sequence (gloo, CPU).

Each worker builds the same inputs from a seed, computes the single-process reference itself
(LocalOps on the full sequence, no communication), runs the SP op on its contiguous part and checks
its slice of the output and of every input gradient; gradients of replicated inputs (initial
state, conv weight and bias) are summed over the SP group first, as the trainer's DP x SP gradient
reduction does.

Document layout used throughout (T = 24; rank parts of 12 at SP = 2, of 6 at SP = 4):
- row 0 starts documents at 0, 3, 12, 14, 21: documents cross rank boundaries, rank 1 of SP = 2 and
  rank 2 of SP = 4 start exactly on a document start, rank 1 and rank 3 of SP = 4 start
  mid-document and rank 3 also has one start inside its part;
- row 1 is one document over the whole row without a start flag on token 0 (every rank but 0
  starts mid-document, the state is carried through all ranks).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_workers

T = 24
ROW0_STARTS = (0, 3, 12, 14, 21)
TIMEOUT = 120
# name -> (world size, SP size); dp2xsp2 runs the collectives on SP sub-groups of a larger world
LAYOUTS = {"sp2": (2, 2), "sp4": (4, 4), "dp2xsp2": (4, 2)}


def _doc_start(B: int = 2) -> torch.Tensor:
    ds = torch.zeros(B, T, dtype=torch.bool)
    ds[0, list(ROW0_STARTS)] = True
    return ds


def _setup(sp: int, mode: str = "ulysses"):
    from lctrain.config import ParallelConfig
    from lctrain.parallel import init_parallel
    return init_parallel(ParallelConfig(sp=sp, sp_attention=mode, timeout_s=60), "cpu")


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _sum_over_sp(pc, t):
    import torch.distributed as dist
    t = t.clone()
    dist.all_reduce(t, group=pc.sp_group)
    return t


def _close(actual, expected, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_every_sequence_op_has_a_parallel_version():
    """An op added to LocalOps but not to SequenceParallelOps would silently run on the local shard
    only (wrong under SP): every public LocalOps method must be overridden."""
    from lctrain.models.seqops import LocalOps
    from lctrain.parallel import SequenceParallelOps
    ops = {n for n in dir(LocalOps) if not n.startswith("_") and callable(getattr(LocalOps, n))}
    assert ops, "LocalOps has no public ops?"
    missing = sorted(n for n in ops if getattr(SequenceParallelOps, n) is getattr(LocalOps, n))
    assert not missing, f"LocalOps ops without a sequence-parallel version: {missing}"


# --- LASP-2 ------------------------------------------------------------------------------------------

def _lasp2_worker(rank, world, sp):
    from lctrain.models.seqops import LocalOps
    pc = _setup(sp)
    ops, local = pc.seq_ops, LocalOps()
    B, H, K, V = 2, 2, 4, 3
    checked = 0
    for gate in ("none", "head", "key"):
        for docs in (False, True):
            for init in (False, True):
                for final in (True, False) if gate == "key" else (True,):
                    gen = torch.Generator().manual_seed(checked)      # same inputs on every rank
                    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
                    v = torch.randn(B, T, H, V, generator=gen)
                    # weak decays so states from several ranks back still matter
                    g = {"none": None, "head": -0.2 * torch.rand(B, T, H, generator=gen),
                         "key": -0.2 * torch.rand(B, T, H, K, generator=gen)}[gate]
                    s0 = torch.randn(B, H, K, V, generator=gen) if init else None
                    ds = _doc_start() if docs else None
                    w_o, w_s = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
                    what = f"gate={gate} docs={docs} init={init} final={final}"

                    ref_in = [_leaf(t) if t is not None else None for t in (q, k, v, g, s0)]
                    o_ref, s_ref = local.linear_attention(*ref_in[:4], doc_start=ds, initial_state=ref_in[4],
                                                          output_final_state=final)
                    loss = (o_ref * w_o).sum() + ((s_ref * w_s).sum() if final else 0)
                    loss.backward()

                    sh = pc.shard_sequence
                    sp_in = [_leaf(sh(t)) if t is not None else None for t in (q, k, v, g)]
                    sp_s0 = _leaf(s0) if init else None
                    o, s = ops.linear_attention(*sp_in, doc_start=sh(ds) if docs else None,
                                                initial_state=sp_s0, output_final_state=final)
                    # the final state is replicated on every rank: count its loss term once over the group
                    loss = (o * sh(w_o)).sum() + ((s * w_s).sum() / sp if final else 0)
                    loss.backward()

                    _close(o, sh(o_ref), f"{what}: output")
                    if final:
                        _close(s, s_ref, f"{what}: final state")
                    else:
                        assert s is None
                    for name, a, b in zip("qkvg", sp_in, ref_in[:4]):
                        if a is not None:
                            _close(a.grad, sh(b.grad), f"{what}: grad {name}")
                    if init:
                        _close(_sum_over_sp(pc, sp_s0.grad), ref_in[4].grad, f"{what}: grad initial_state")
                    checked += 1
    pc.shutdown()
    return checked


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lasp2_matches_single_process(layout):
    """Output, final state and gradients (q, k, v, g, initial state) for every gate kind."""
    world, sp = LAYOUTS[layout]
    counts = run_workers(_lasp2_worker, world, sp, timeout=TIMEOUT)
    assert counts == [16] * world


# --- softmax attention ---------------------------------------------------------------------------------

def _attention_worker(rank, world, sp):
    from lctrain.models.seqops import LocalOps
    from lctrain.parallel import SequenceParallelOps
    pc = _setup(sp)
    local = LocalOps()
    B, H, D = 2, 4, 8
    L = T // sp
    checked = []
    for mode in ("ulysses", "lasp2h"):
        ops = SequenceParallelOps(pc.sp_group, sp_attention=mode)
        for hkv in (4, 2, 1):               # MHA, GQA, MQA (KV heads < SP at SP = 4)
            # windows: one part or less, spanning two ranks, spanning three (W-1 > 2L at SP = 4)
            for window in (None, 3, L + 2, 2 * L + 3):
                for docs in (False, True):
                    gen = torch.Generator().manual_seed(7 * hkv + (window or 0))
                    q = torch.randn(B, T, H, D, generator=gen)
                    k, v = torch.randn(B, T, hkv, D, generator=gen), torch.randn(B, T, hkv, D, generator=gen)
                    w = torch.randn(B, T, H, D, generator=gen)
                    ds = _doc_start() if docs else None
                    what = f"{mode} hkv={hkv} window={window} docs={docs}"
                    ref = [_leaf(t) for t in (q, k, v)]
                    o_ref = local.attention(*ref, doc_start=ds, window=window)
                    (o_ref * w).sum().backward()
                    sh = pc.shard_sequence
                    mine = [_leaf(sh(t)) for t in (q, k, v)]
                    o = ops.attention(*mine, doc_start=sh(ds) if docs else None, window=window)
                    (o * sh(w)).sum().backward()
                    _close(o, sh(o_ref), f"{what}: output")
                    for name, a, b in zip("qkv", mine, ref):
                        _close(a.grad, sh(b.grad), f"{what}: grad {name}")
                    checked.append(what)
                    kinds = ops.meter.pop()
                    expect = "halo_window" if window is not None else mode
                    assert set(kinds) - {"doc_start"} <= {expect}, (what, kinds)
    # Ulysses needs whole query heads per rank
    ops = SequenceParallelOps(pc.sp_group, sp_attention="ulysses")
    q = torch.randn(1, T // sp, sp + 1, D)
    with pytest.raises(ValueError, match="query heads are not divisible"):
        ops.attention(q, q, q)
    pc.shutdown()
    return len(checked)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_attention_matches_single_process(layout):
    """Ulysses and LASP-2H (MHA, GQA, KV heads < SP), with documents and sliding windows (halo)."""
    world, sp = LAYOUTS[layout]
    counts = run_workers(_attention_worker, world, sp, timeout=TIMEOUT)
    assert counts == [2 * 3 * 4 * 2] * world


# --- causal conv, gather ------------------------------------------------------------------------------

def _conv_gather_worker(rank, world, sp):
    from lctrain.models.seqops import LocalOps
    pc = _setup(sp)
    ops, local = pc.seq_ops, LocalOps()
    B, D = 2, 5
    L = T // sp
    sh = pc.shard_sequence
    n = 0
    for width in (2, 4, L + 3):             # L + 3: the k-1 halo spans two ranks
        for bias in (False, True):
            for docs in (False, True):
                for act in (None, "silu"):
                    gen = torch.Generator().manual_seed(width * 10 + bias)
                    x, wt = torch.randn(B, T, D, generator=gen), torch.randn(D, width, generator=gen)
                    b = torch.randn(D, generator=gen) if bias else None
                    w = torch.randn(B, T, D, generator=gen)
                    ds = _doc_start() if docs else None
                    what = f"conv width={width} bias={bias} docs={docs} act={act}"
                    ref = [_leaf(t) if t is not None else None for t in (x, wt, b)]
                    y_ref = local.causal_conv(*ref, doc_start=ds, activation=act)
                    (y_ref * w).sum().backward()
                    mine = [_leaf(sh(x)), _leaf(wt), _leaf(b) if bias else None]
                    y = ops.causal_conv(*mine, doc_start=sh(ds) if docs else None, activation=act)
                    (y * sh(w)).sum().backward()
                    _close(y, sh(y_ref), f"{what}: output")
                    _close(mine[0].grad, sh(ref[0].grad), f"{what}: grad x")
                    _close(_sum_over_sp(pc, mine[1].grad), ref[1].grad, f"{what}: grad weight")
                    if bias:
                        _close(_sum_over_sp(pc, mine[2].grad), ref[2].grad, f"{what}: grad bias")
                    n += 1
    # gather_sequence: each rank reads the whole sequence through a causal map and keeps the loss
    # of its own positions; summed over ranks that is the single-process loss.
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    xr = _leaf(x)
    (xr.cumsum(1) * w).sum().backward()
    xl = _leaf(sh(x))
    full = ops.gather_sequence(xl, dim=1)
    _close(full, x, "gather_sequence: value")
    (sh(full.cumsum(1)) * sh(w)).sum().backward()
    _close(xl.grad, sh(xr.grad), "gather_sequence: grad")
    assert ops.position_offset(L) == pc.sp_rank * L and ops.global_seq_len(L) == T
    pc.shutdown()
    return n


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_halo_conv_and_gather_match_single_process(layout):
    world, sp = LAYOUTS[layout]
    counts = run_workers(_conv_gather_worker, world, sp, timeout=TIMEOUT)
    assert counts == [3 * 2 * 2 * 2] * world


# --- communication accounting -------------------------------------------------------------------------

def _bytes_worker(rank, world, sp):
    from lctrain.parallel import SequenceParallelOps
    from lctrain.parallel import costs
    pc = _setup(sp)
    B, L = 2, T // sp
    got, want = {}, {}

    def step(name, key, fn, expected):
        pc.pop_comm_bytes()
        fn().sum().backward()
        got[name] = pc.pop_comm_bytes().get(key, 0)
        want[name] = expected

    H, K, V = 2, 4, 3
    q = _leaf(torch.randn(B, L, H, K))
    for gate in ("none", "head", "key"):
        g = {"none": None, "head": -torch.rand(B, L, H), "key": -torch.rand(B, L, H, K)}[gate]
        step(f"lasp2 {gate}", "lasp2", lambda: pc.seq_ops.linear_attention(q, q, q[..., :V], g)[0],
             costs.lasp2_bytes(B, H, K, V, gate, sp))
    Hq, Hkv, D = 4, 1, 8
    qa, ka = _leaf(torch.randn(B, L, Hq, D)), _leaf(torch.randn(B, L, Hkv, D))
    step("ulysses", "ulysses", lambda: pc.seq_ops.attention(qa, ka, ka), costs.ulysses_bytes(B, L, Hq, Hkv, D, sp, 4))
    l2h = SequenceParallelOps(pc.sp_group, "lasp2h", meter=pc.comm_meter)
    step("lasp2h", "lasp2h", lambda: l2h.attention(qa, ka, ka), costs.lasp2h_bytes(B, L, Hkv, D, sp, 4))
    W = L + 2
    step("halo_window", "halo_window", lambda: pc.seq_ops.attention(qa, ka, ka, window=W),
         costs.halo_window_bytes(B, L, Hkv, D, W, sp, pc.sp_rank, 4))
    x, wt = _leaf(torch.randn(B, L, 5)), _leaf(torch.randn(5, 4))
    step("halo_conv", "halo_conv", lambda: pc.seq_ops.causal_conv(x, wt),
         costs.halo_conv_bytes(B, L, 5, 4, sp, pc.sp_rank, 4))
    pc.shutdown()
    return got, want


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("sp", [2, 4])
def test_comm_bytes_match_analytic_costs(sp):
    """pop_comm_bytes (forward + backward) equals the analytic message sizes of lctrain.parallel.costs,
    and LASP-2's bytes do not depend on the sequence length."""
    for got, want in run_workers(_bytes_worker, sp, sp, timeout=TIMEOUT):
        assert got == want
    from lctrain.parallel import costs
    assert costs.lasp2_bytes(1, 4, 64, 64, "key", sp) > 0
    assert costs.halo_tokens(L=6, h=2, P=sp, r=sp - 1) == 0          # the last rank sends no halo
    assert costs.halo_tokens(L=6, h=8, P=4, r=0) == 6 + 2             # spans two later ranks
