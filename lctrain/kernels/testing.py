"""Helpers shared by the kernel tests and the benchmark: random GLA inputs and a forward+backward
comparison of two backends (outputs, final states and every input gradient)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

from lctrain.kernels.gla import gated_linear_attention


def gla_inputs(B: int, T: int, H: int, K: int, V: int, gate: str = "head", *, decay: float = 1.0,
               dtype=torch.float32, n_states: Optional[int] = None, device="cpu", seed: int = 0):
    """q, k, v, g (log-decay <= 0, scaled by `decay`) and an initial state for n_states sequences
    (None when n_states is None). gate: "none" | "head" | "key"."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = None
    if gate != "none":
        g = F.logsigmoid(r(B, T, H, *(() if gate == "head" else (K,))) + 2.0) * decay
    s0 = None if n_states is None else r(n_states, H, K, V)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(q), to(k), to(v), to(g), (None if s0 is None else s0.to(device=device,
                                                                   dtype=torch.promote_types(dtype, torch.float32)))


def run_with_grads(q, k, v, g, s0, *, backend: str, cu_seqlens=None, scale=None, seed: int = 1):
    """Forward + backward with fixed random cotangents on o and on the final state."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v, g, s0)]
    o, fs = gated_linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                   cu_seqlens=cu_seqlens, scale=scale, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    dfs = torch.randn(fs.shape, generator=gen, dtype=torch.float64).to(fs)
    ((o * do).sum() + (fs * dfs).sum()).backward()
    grads = {n: t.grad for n, t in zip("qkvgs", leaves) if t is not None}
    return o.detach(), fs.detach(), grads


def assert_backends_match(ref, out, *, rtol: float, atol: float):
    """ref/out: results of run_with_grads; every gradient must be finite and close."""
    (o1, f1, g1), (o2, f2, g2) = ref, out
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol, msg=lambda m: "output: " + m)
    torch.testing.assert_close(f2, f1, rtol=rtol, atol=atol, msg=lambda m: "final state: " + m)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.isfinite(g2[name]).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(g2[name], g1[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: " + m)


# ---------------------------------------------------------------------------------------------
# The Triton test cases (tests/test_kernels_triton.py runs them under the interpreter against the
# recurrent oracle; scripts/triton_compile_check.py compiles their launches ahead of time;
# benchmarks/gpu_check.py runs them compiled on CUDA against the chunk path).

# an empty document, two length-1 documents, a document over two chunks, boundaries off chunk edges
VARLEN_CU = [0, 5, 5, 6, 90, 91, 150]


def _case(B, T, H, K, V, gate, decay=1.0, with_state=True, cu=None):
    return dict(B=B, T=T, H=H, K=K, V=V, gate=gate, decay=decay, with_state=with_state, cu=cu)


TRITON_CASES = {
    # T = 83: two chunks, the second partial; K != V, V not a power of two
    **{f"basic-{g}-{'s0' if s else 'nos0'}": _case(2 if g != "key" else 1, 83, 2, 16, 24, g, with_state=s)
       for g in ("none", "head", "key") for s in (False, True)},
    **{f"varlen-{g}": _case(1, VARLEN_CU[-1], 1 if g == "key" else 2, 16, 20, g, cu=VARLEN_CU)
       for g in ("none", "head", "key")},
    **{f"decay{d:g}-{g}": _case(1, 70, 1, 16, 16, g, decay=d) for g in ("head", "key") for d in (0.1, 10.0, 30.0)},
    # K = 80, V = 72: two 64-wide blocks each, the second partial (per-head dg sums K-block partials)
    **{f"blocks-{g}": _case(1, 70, 1, 80, 72, g) for g in ("none", "head")},
}

# production head shapes (K = V = 128 as GLA / BASED, K = 128 and V = 64 as Mamba-2), for the
# compile check's --full mode and the GPU check
# (H = 16 as the GPU check's benchmark, so its autotuned kernels are compiled once)
PRODUCTION_CASES = {
    **{f"prod-{g}-128x128": _case(1, 300, 16, 128, 128, g) for g in ("none", "head", "key")},
    **{f"prod-{g}-128x64": _case(1, 300, 16, 128, 64, g) for g in ("none", "head")},
    "prod-varlen-key-128x128": _case(1, 600, 16, 128, 128, "key", cu=[0, 1, 200, 265, 600]),
}


def case_inputs(case: dict, *, dtype=torch.float32, g_dtype=None, device="cpu"):
    """gla_inputs of a TRITON_CASES entry, q/k/v in `dtype`, g in `g_dtype` (default: dtype), the
    initial state in fp32, and the case's cu_seqlens tensor (or None)."""
    cu = case["cu"]
    n = (len(cu) - 1 if cu is not None else case["B"]) if case["with_state"] else None
    q, k, v, g, s0 = gla_inputs(case["B"], case["T"], case["H"], case["K"], case["V"], case["gate"],
                                decay=case["decay"], n_states=n, device=device)
    to = lambda t, d: None if t is None else t.to(d)
    cu_t = None if cu is None else torch.tensor(cu, device=device)
    return to(q, dtype), to(k, dtype), to(v, dtype), to(g, g_dtype or dtype), s0, cu_t


@contextmanager
def record_launches(run: bool = True):
    """Record every Triton launch of the GLA backend as (kernel, grid, args, meta) into the yielded
    list; with run=False the kernels are not run (outputs stay uninitialised): the host code still
    builds every launch, so shapes, dtypes and constexprs can be recorded on any machine."""
    from lctrain.kernels import gla_triton as gt
    rec: list = []
    old = gt._RECORD, gt._RUN
    gt._RECORD, gt._RUN = rec, run
    try:
        yield rec
    finally:
        gt._RECORD, gt._RUN = old
