"""Launch grids hold CUDA's limits (x <= 2^31 - 1, y, z <= 65535) for any length and any number of
documents: computed for T up to 16M tokens and up to 1M documents, without running a kernel."""
import itertools

import pytest
import torch

from lctrain.kernels import gla_triton as gt
from lctrain.kernels.gla_triton_fwd import BLOCKS
from lctrain.kernels.testing import gla_inputs, record_launches


def n_chunks(T: int, n_docs: int) -> int:
    """Chunks of T tokens cut into n_docs documents of near-equal length (each chunked on its own)."""
    L, r = divmod(T, n_docs)
    c = lambda n: -(-n // gt.BT)
    return (n_docs - r) * c(L) + r * c(L + 1)


def assert_within_limits(grid, what):
    assert len(grid) <= 3 and all(g >= 1 for g in grid), (what, grid)
    for dim, (g, cap) in enumerate(zip(grid, gt.GRID_MAX)):
        assert g <= cap, f"{what}: grid {grid} exceeds CUDA's limit {cap} in dimension {'xyz'[dim]}"


def test_chunk_count_formula_matches_the_tables():
    for T, n in [(1000, 3), (4096, 64), (777, 777), (130, 2)]:
        L, r = divmod(T, n)
        lens = [L + 1] * r + [L] * (n - r)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)))
        tab = gt._Tables(1, T, cu, "cpu")
        assert tab.nchunks == n_chunks(T, n) and tab.nseq == n


@pytest.mark.parametrize("T", [2 ** 12, 2 ** 20, 2 ** 22 + 1, 2 ** 24])
@pytest.mark.parametrize("n_docs", [1, 4096, 65536, 2 ** 20])
def test_grids_within_cuda_limits(T, n_docs):
    if n_docs > T:
        pytest.skip("more documents than tokens")
    NC = n_chunks(T, n_docs)
    for H, (K, V) in itertools.product([1, 16, 64], [(64, 64), (128, 128), (128, 64), (256, 256)]):
        for name, grid in gt.grids(NC, n_docs, H, K, V).items():
            for BK, BV, gate in itertools.product(BLOCKS, BLOCKS, (0, 1, 2)):
                assert_within_limits(grid(dict(BK=BK, BV=BV, GATE=gate)), f"{name} T={T} docs={n_docs} H={H}")


def test_host_launches_use_the_bounded_grids():
    """The real host code (forward + backward of every gate kind, kernels not run) with 70000
    documents of one head: more sequences x heads than CUDA's y / z limit, all launches in bounds."""
    n_docs = 70_000
    cu = torch.arange(n_docs + 1) * 2
    for gate in ("none", "head", "key"):
        q, k, v, g, s0 = gla_inputs(1, 2 * n_docs, 1, 16, 16, gate, n_states=n_docs)
        leaves = [t.requires_grad_(True) if t is not None else None for t in (q, k, v, g, s0)]
        with record_launches(run=False) as rec:
            o, fs = gt.triton_gla(*leaves[:4], 0.25, leaves[4], True, cu)
            (o.sum() + fs.sum()).backward()
        names = {kern.fn.__name__ if hasattr(kern, "fn") else kern.__name__ for kern, *_ in rec}
        assert {"_fwd_h_kernel", "_fwd_o_kernel", "_bwd_dh_kernel", "_bwd_dqk_kernel"} <= names
        for kern, grid, args, meta in rec:
            for BK, BV in itertools.product(BLOCKS, BLOCKS):
                assert_within_limits(grid({"BK": BK, "BV": BV, **meta}), f"{names} gate={gate}")
