"""Helpers shared by the kernel tests and the benchmark: random GLA inputs and a forward+backward
comparison of two backends (outputs, final states and every input gradient)."""
from __future__ import annotations

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
