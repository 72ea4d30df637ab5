"""MoE FFN (letter E): hand-made routing cases for capacity drops, priority, gates and the
load-balancing loss; chunk routing's window rule and causality; decoding state; active params."""
import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.models import LanguageModel, SeqContext, build_config
from lctrain.models.moe import MoE, MoEConfig


class Lm:
    ffn_mult, init_std, n_layers = 8 / 3, 0.02, 2


def make(d=3, router=None, **kw):
    m = MoE(d, MoEConfig(**kw), Lm)
    with torch.no_grad():
        torch.nn.init.normal_(m.w_gate_up, std=0.5)
        torch.nn.init.normal_(m.w_down, std=0.5)
        if router is not None:
            m.router.weight.copy_(torch.tensor(router, dtype=torch.float32))
    return m


def expert(m, e, x):
    g, u = (x @ m.w_gate_up[e]).chunk(2, -1)
    return (F.silu(g) * u) @ m.w_down[e]


def onehots(*idx, d=3):
    return torch.eye(d)[list(idx)][None]                      # [1, T, d]


def test_top1_capacity_drop_and_aux_loss():
    # expert 3 is never routed and has NaN weights: it must never run
    m = make(router=[[2, 0, 0], [0, 2, 0], [0, 0, 2], [-5, -5, -5]], n_experts=4, top_k=1, hidden=2,
             capacity_factor=1.0).train()
    with torch.no_grad():
        m.w_gate_up[3] = float("nan")
    x = onehots(0, 0, 0, 1, 2, 0)          # experts 0 0 0 1 2 0; capacity ceil(6 * 1 / 4) = 2
    y = m(x, SeqContext())
    with torch.no_grad():
        want = torch.stack([expert(m, 0, x[0, 0]), expert(m, 0, x[0, 1]), torch.zeros(3),   # 3rd of expert 0: dropped
                            expert(m, 1, x[0, 3]), expert(m, 2, x[0, 4]), torch.zeros(3)])  # 4th: dropped
    torch.testing.assert_close(y[0], want)
    # Switch aux: E * sum_e f_e P_e, by hand
    z = math.exp(2) + 2 + math.exp(-5)
    hi, lo, neg = math.exp(2) / z, 1 / z, math.exp(-5) / z      # probabilities of a token's 4 experts
    f = [4 / 6, 1 / 6, 1 / 6, 0.0]
    P = [(4 * hi + 2 * lo) / 6, (5 * lo + hi) / 6, (5 * lo + hi) / 6, neg]
    aux = 4 * sum(a * b for a, b in zip(f, P))
    assert m.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert m.stats["moe_dropped"] == pytest.approx(2 / 6)
    assert m.stats["moe_max_load"] == pytest.approx(4 * 4 / 6)
    m.aux_loss.backward()
    assert float(m.router.weight.grad.abs().sum()) > 0
    # outside training nothing is dropped (eval_capacity_factor 0 = no limit)
    with torch.no_grad():
        y_eval = m.eval()(x, SeqContext())
        torch.testing.assert_close(y_eval[0, 2], expert(m, 0, x[0, 2]))
        torch.testing.assert_close(y_eval[0, 5], expert(m, 0, x[0, 5]))
        assert m.stats["moe_dropped"] == 0.0


def test_top2_priority_is_position_then_choice_and_gates_renormalise():
    # token choices (first, second): t0 (0, 1), t1 (1, 0), t2 (0, 2); capacity ceil(0.5 * 6 / 3) = 1
    m = make(router=[[2, 1, 2], [1, 2, 0], [0, 0, 1]], n_experts=3, top_k=2, hidden=4, capacity_factor=0.5).train()
    x = onehots(0, 1, 2)
    with torch.no_grad():
        y = m(x, SeqContext())
        e = math.e
        want = torch.stack([e / (e + 1) * expert(m, 0, x[0, 0]) + 1 / (e + 1) * expert(m, 1, x[0, 0]),
                            torch.zeros(3),                           # both choices find their expert full
                            1 / (e + 1) * expert(m, 2, x[0, 2])])     # first choice (0) full, second kept
    torch.testing.assert_close(y[0], want)
    assert m.stats["moe_dropped"] == pytest.approx(3 / 6)
    m2 = make(router=[[2, 1, 2], [1, 2, 0], [0, 0, 1]], n_experts=3, top_k=2, hidden=4, capacity_factor=0.5,
              normalize_gates=False).train()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        p0 = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
        want0 = p0[0] * expert(m, 0, x[0, 0]) + p0[1] * expert(m, 1, x[0, 0])
        torch.testing.assert_close(m2(x, SeqContext())[0, 0], want0)


def test_chunk_routing_window_rule():
    """Chunk c of a document is routed by the mean router logits of [cC - C + 1, cC] within the document."""
    C, T = 3, 12
    m = make(d=4, n_experts=5, top_k=2, hidden=4, routing="chunk", chunk_size=C).eval()
    x = torch.randn(1, T, 4)
    ds = torch.zeros(1, T, dtype=torch.bool)
    ds[0, 5] = True
    with torch.no_grad():
        probs, _, experts = m.route(x, SeqContext(doc_start=ds))
        logits = m.router(x)[0]
    want = []
    for t in range(T):
        d0 = 0 if t < 5 else 5
        s = d0 + (t - d0) // C * C                   # first token of t's chunk
        lo = max(s - C + 1, d0)
        want.append(torch.softmax(logits[lo:s + 1].mean(0), 0))
    torch.testing.assert_close(probs, torch.stack(want))
    assert torch.equal(experts[5], experts[7]) and torch.equal(experts[8], experts[10])


def test_chunk_routing_is_causal_with_drops():
    m = make(d=8, n_experts=4, top_k=2, hidden=8, routing="chunk", chunk_size=4, capacity_factor=0.6).train()
    x = torch.randn(2, 20, 8)
    with torch.no_grad():
        base = m(x, SeqContext())
        assert m.stats["moe_dropped"] > 0
        for t in (3, 9, 14):
            x2 = x.clone()
            x2[:, t] += 2.0
            diff = (m(x2, SeqContext()) - base).abs().amax(-1)
            assert float(diff[:, :t].max()) == 0.0, t
            assert float(diff[:, t:].max()) > 0.0, t


@pytest.mark.parametrize("routing", ["token", "chunk"])
def test_cached_calls_equal_full_forward(routing):
    m = make(d=8, n_experts=4, top_k=2, hidden=8, routing=routing, chunk_size=4).eval()
    x = torch.randn(2, 23, 8)
    with torch.no_grad():
        full = m(x, SeqContext())
        cache, outs, s = {}, [], 0
        for n in (1, 2, 5, 1, 1, 7, 6):
            outs.append(m(x[:, s:s + n], SeqContext(position_offset=s), cache))
            s += n
        if routing == "chunk":
            assert cache["logits"].shape[1] < 2 * 4
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_active_params():
    cfg = build_config({"vocab_size": 50, "d_model": 16, "n_layers": 2, "pattern": "A", "ffn_pattern": "SE",
                        "ffns": {"moe": {"n_experts": 6, "top_k": 2, "hidden": 24}}})
    model = LanguageModel(cfg)
    assert model.num_params() - model.num_params(active=True) == 4 * 3 * 16 * 24
