"""Per-head and exact chunked state-collapse knobs (lctrain/models/recurrent.py)."""
import math

import pytest
import torch

from lctrain.models import InferenceKnobs, LanguageModel, LMConfig
from lctrain.models.recurrent import _cap_factors, _cap_factors_cpu, _capped, _capped_reference


def _inputs(B, T, H, K, V, gate, growth=1.0):
    torch.manual_seed(1)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K) * growth
    v = torch.randn(B, T, H, V)
    g = None if gate == "none" else (-torch.rand(B, T, H) * 0.05 if gate == "head"
                                     else -torch.rand(B, T, H, K) * 0.05)
    return q, k, v, g


def test_cap_factor_loops_agree():
    """The numba loop (CPU, no autograd) and the TorchScript loop (CUDA, autograd) give the same factors,
    with caps that bind on some tokens and not on others."""
    torch.manual_seed(0)
    B, H, C = 2, 5, 64
    d = torch.rand(B, H, C) * 0.1 + 0.9
    kk, vv = torch.randn(B, H, C, 8), torch.randn(B, H, C, 4)
    M = (kk @ kk.transpose(-1, -2)) * (vv @ vv.transpose(-1, -2))
    kv, kvn = torch.randn(B, H, C), kk.pow(2).sum(-1) * vv.pow(2).sum(-1)
    rsum, cap = torch.rand(B, H) * 20, torch.tensor([1.0, 3.0, 10.0, 1e9, 5.0]).expand(B, H).contiguous()
    a, b = _cap_factors(d, M, kv, kvn, rsum, cap), _cap_factors_cpu(d, M, kv, kvn, rsum, cap)
    assert 0.0 < a.min() < 1.0 and (a[:, 3] == 1.0).all()              # binding and never-binding heads
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("gate", ["head", "key", "none"])
@pytest.mark.parametrize("cap", [3.0, "heads"])
def test_chunked_state_norm_equals_the_token_by_token_definition(gate, cap):
    B, T, H, K, V = 2, 150, 3, 8, 4                   # 150: two full chunks of 64 and a partial one
    q, k, v, g = _inputs(B, T, H, K, V, gate)
    c = torch.tensor([2.0, math.inf, 5.0]) if cap == "heads" else cap
    S0 = torch.randn(B, H, K, V) * 0.3
    o_ref, S_ref = _capped_reference(q, k, v, g, 0.5, S0, c)
    o, S = _capped(q, k, v, g, 0.5, S0, c)
    assert torch.allclose(o, o_ref, atol=2e-4, rtol=2e-4), (o - o_ref).abs().max()
    assert torch.allclose(S, S_ref, atol=2e-4, rtol=2e-4), (S - S_ref).abs().max()
    norms = S.flatten(-2).norm(dim=-1)
    assert (norms <= torch.as_tensor(c).expand(H) * (1 + 1e-4)).all()
    if cap == "heads":                                # the uncapped head grew past every cap
        assert norms[:, 1].min() > 5.0
