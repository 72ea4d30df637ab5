"""Recurrent mixers (Mamba-2, GLA, BASED linear attention, BaseConv), their presets, recipes and the
state-collapse knobs. Every mixer is checked against a reference written from its equations here
(naive per-token loops / the quadratic form), independent of lctrain.kernels."""
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import load_recipe
from lctrain.models import InferenceKnobs, LanguageModel, SeqContext, build_config
from lctrain.models import recurrent
from lctrain.models.based import BaseConv, BasedLinearAttention
from lctrain.models.gla import GatedLinearAttention
from lctrain.models.mamba2 import Mamba2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 61

TINY = {
    "mamba2": {"d_model": 32, "n_layers": 2,
               "mixers": {"mamba2": {"d_state": 8, "headdim": 8, "ngroups": 2}}},
    "gla": {"d_model": 32, "n_layers": 2, "mixers": {"gla": {"n_heads": 2}}},
    "based": {"d_model": 32, "mixers": {"based": {"n_heads": 2, "feature_dim": 4},
                                        "swa": {"n_heads": 2, "window": 5}}},
}
ARCHS = list(TINY)


def tiny_model(arch, **over):
    cfg = build_config({"arch": arch, "vocab_size": V, **TINY[arch], **over})
    return LanguageModel(cfg)


def randomize_(model):
    """Move the special parameters off their init values (ones / zeros) so every term is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_weight", "D", "bias")) or ".norm" in name:
                p.add_(0.3 * torch.randn_like(p))


def decode_logits(model, ids, prefill, knobs=None):
    """Prefill `prefill` tokens in chunks of 3, then decode the rest one token at a time."""
    cache = model.init_cache(knobs)
    outs = []
    for s in range(0, prefill, 3):
        outs.append(model(ids[:, s:min(s + 3, prefill)], cache=cache).logits)
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache).logits)
    return torch.cat(outs, 1), cache


# --- the LM presets -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_forward_equals_chunked_prefill_and_decode(arch):
    model = tiny_model(arch).eval()
    randomize_(model)
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        for prefill in (0, 7, 13):
            dec, _ = decode_logits(model, ids, prefill)
            torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch):
    model = tiny_model(arch)
    randomize_(model)
    ids = torch.randint(0, V, (2, 12))
    out = model(ids).logits
    F.cross_entropy(out[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_steps_reduce_loss(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_are_independent(arch):
    model = tiny_model(arch).eval()
    randomize_(model)
    doc1, doc2, other = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 15))
    row = torch.cat([doc1, doc2], 1)
    ids = torch.cat([row, other], 0)
    doc_start = torch.zeros(2, 15, dtype=torch.bool)
    doc_start[0, 6] = True
    with torch.no_grad():
        packed = model(ids, SeqContext(doc_start=doc_start)).logits
        torch.testing.assert_close(packed[0, 6:], model(doc2).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[0, :6], model(doc1).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[1], model(other).logits[0], rtol=1e-5, atol=1e-5)
        # without the document start, doc 2 does see doc 1 (the test above can fail)
        assert (model(ids).logits[0, 6:] - packed[0, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_state_elements_match_the_decoding_cache(arch):
    """state_elements(t) = the numbers the cache really holds after t tokens (recurrent + conv + KV)."""
    model = tiny_model(arch).eval()
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        _, cache = decode_logits(model, ids, 4)
    held = sum(v.numel() for layer in cache.layers for v in layer.values() if torch.is_tensor(v))
    assert held == model.state_elements(9)
    assert all(b.mixer.flops_per_token(64) > 0 for b in model.layers)


def test_based_preset_is_the_reference_layer_mix():
    cfg = build_config({"arch": "based", "vocab_size": V, "d_model": 32})
    assert cfg.pattern == "CBWCC" and cfg.ffn_pattern == "S" and cfg.mixers["swa"].window == 65
    r = load_recipe(os.path.join(ROOT, "recipes", "based-360m.yaml")).model
    letters = "".join(m for m, _ in r.layer_letters())
    assert [i for i, c in enumerate(letters) if c == "B"] == [1, 6, 11, 16, 21]
    assert [i for i, c in enumerate(letters) if c == "W"] == [2, 7, 12, 17, 22]
    assert letters.count("C") == 17 and len(letters) == 27


# --- recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,target", [("mamba2-370m", 370e6), ("gla-340m", 340e6), ("based-360m", 360e6),
                                         ("transformer-350m", 350e6)])
def test_paper_recipe_parameter_counts(name, target):
    cfg = load_recipe(os.path.join(ROOT, "recipes", f"{name}.yaml")).model
    assert cfg.vocab_size > 0
    with torch.device("meta"):
        model = LanguageModel(cfg)
    n = model.num_params()
    assert abs(n - target) <= 0.05 * target, (name, n)


@pytest.mark.parametrize("arch", ["mamba2", "gla", "based", "transformer"])
def test_cpu_recipes_validate_and_are_small(arch):
    r = load_recipe(os.path.join(ROOT, "recipes", f"{arch}-cpu.yaml"))
    assert r.model.arch == arch and r.train.seq_len == 256 and 200 <= r.train.steps <= 300
    r.model.vocab_size = r.tokenizer.vocab_size
    with torch.device("meta"):
        model = LanguageModel(r.model)
    assert 0.5e6 < model.num_params(non_embedding=True) < 4e6


# --- layers vs references from the equations ------------------------------------------------------

def lm_stub(d_model=32):
    return build_config({"arch": "transformer", "vocab_size": V, "d_model": d_model})


def mixer(cls, opts, d_model=32):
    torch.manual_seed(1)
    m = cls(d_model, cls.Config(**opts), 0, lm_stub(d_model))
    for p in m.parameters():                 # generic LM init does not run here: give every weight a value
        if p.dim() == 2 and not getattr(p, "_no_weight_decay", False):
            torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("norm_weight", "bias", "D")):
                p.add_(0.3 * torch.randn_like(p))
    return m


def conv_ref(x, w, b):
    """y_t = b + sum_j w[:, j] x_{t-(W-1)+j} with zero history."""
    W, T = w.shape[1], x.shape[1]
    xp = F.pad(x, (0, 0, W - 1, 0))
    y = sum(xp[:, j:j + T] * w[:, j] for j in range(W))
    return y if b is None else y + b


def ssd_reference(m: Mamba2, x, decay_scale=1.0):
    """Mamba-2 from its equations: h_t = exp(s dt_t A) h_{t-1} + dt_t x_t B_t^T (per head, state [P, N]),
    y_t = h_t C_t + D x_t, y = rmsnorm_group(y * silu(z)) * w, out_proj. decay_scale s scales only
    the decay."""
    Bsz, T, _ = x.shape
    H, P, N, G = m.nheads, m.headdim, m.d_state, m.ngroups
    zxbcdt = x @ m.in_proj.weight.T
    z, xbc, dt = zxbcdt.split([m.d_inner, m.conv_dim, H], -1)
    xbc = F.silu(conv_ref(xbc, m.conv_weight, m.conv_bias))
    xs, Bm, Cm = xbc.split([m.d_inner, G * N, G * N], -1)
    xs, Bm, Cm = xs.reshape(Bsz, T, H, P), Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    y = torch.zeros(Bsz, T, H, P)
    for b in range(Bsz):
        for h in range(H):
            g = h // (H // G)
            state = torch.zeros(P, N)
            for t in range(T):
                state = torch.exp(decay_scale * dt[b, t, h] * A[h]) * state \
                    + dt[b, t, h] * torch.outer(xs[b, t, h], Bm[b, t, g])
                y[b, t, h] = state @ Cm[b, t, g] + m.D[h] * xs[b, t, h]
    y = y.reshape(Bsz, T, G, -1) * F.silu(z).reshape(Bsz, T, G, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.eps)
    return (y.reshape(Bsz, T, -1) * m.norm_weight) @ m.out_proj.weight.T


def gla_reference(m: GatedLinearAttention, x):
    Bsz, T, _ = x.shape
    H, K, Vd = m.n_heads, m.head_k, m.head_v
    q, k, v = (x @ m.q_proj.weight.T).view(Bsz, T, H, K), (x @ m.k_proj.weight.T).view(Bsz, T, H, K), \
        (x @ m.v_proj.weight.T).view(Bsz, T, H, Vd)
    alpha = torch.sigmoid(x @ m.gk_down.weight.T @ m.gk_up.weight.T + m.gk_up.bias) ** (1 / 16)
    alpha = alpha.view(Bsz, T, H, K)                    # exp(logsigmoid(.) / 16)
    o = torch.zeros(Bsz, T, H, Vd)
    S = torch.zeros(Bsz, H, K, Vd)
    for t in range(T):
        S = alpha[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S) * K ** -0.5
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.eps) * m.norm_weight
    o = o * F.silu((x @ m.g_proj.weight.T).view(Bsz, T, H, Vd))
    return o.reshape(Bsz, T, -1) @ m.out_proj.weight.T


def based_reference(m: BasedLinearAttention, x):
    """The reference's quadratic form: A = tril(1 + qk/sqrt(d) + (qk)^2/2d), y = A v / rowsum(A)."""
    Bsz, T, _ = x.shape
    H, Fd, Dh = m.n_heads, m.feature_dim, m.head_dim
    q = (x @ m.proj_q.weight.T).view(Bsz, T, H, Fd).transpose(1, 2)
    k = (x @ m.proj_k.weight.T).view(Bsz, T, H, Fd).transpose(1, 2)
    v = (x @ m.proj_v.weight.T).view(Bsz, T, H, Dh).transpose(1, 2)
    s = q @ k.transpose(-1, -2)
    A = torch.tril(1 + s / math.sqrt(Fd) + s ** 2 / (2 * Fd))
    y = (A @ v) / A.sum(-1, keepdim=True)
    return y.transpose(1, 2).reshape(Bsz, T, -1) @ m.out_proj.weight.T


def baseconv_reference(m: BaseConv, x):
    u1, u2 = (x @ m.in_proj.weight.T + m.in_proj.bias).chunk(2, -1)
    return (F.silu(conv_ref(u1, m.conv_weight, m.conv_bias)) * u2) @ m.out_proj.weight.T + m.out_proj.bias


LAYERS = [
    (Mamba2, {"d_state": 8, "headdim": 8, "ngroups": 2}, ssd_reference),
    (GatedLinearAttention, {"n_heads": 2}, gla_reference),
    (BasedLinearAttention, {"n_heads": 2, "feature_dim": 4}, based_reference),
    (BaseConv, {"expand_proj": 4, "kernel_size": 3, "conv_bias": True}, baseconv_reference),
]


@pytest.mark.parametrize("cls,opts,ref", LAYERS, ids=[c[0].name for c in LAYERS])
def test_layer_matches_reference(cls, opts, ref):
    m = mixer(cls, opts)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        want = ref(m, x)
        torch.testing.assert_close(m(x, SeqContext(), None), want, rtol=1e-4, atol=1e-5)
        cache, outs = {}, []                 # decoding path: 4-token chunk, then single tokens
        for s, e in [(0, 4)] + [(t, t + 1) for t in range(4, 11)]:
            outs.append(m(x[:, s:e], SeqContext(position_offset=s), cache))
        torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-4, atol=1e-5)


def test_mamba2_init_and_no_weight_decay():
    m = Mamba2(64, Mamba2.Config(d_state=8, headdim=4), 0, lm_stub(64))      # 32 heads
    A = torch.exp(m.A_log)
    dt = F.softplus(m.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and A.std() > 1
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all() and dt.max() / dt.min() > 5
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.dt_bias, m.D))


# --- state-collapse knobs -------------------------------------------------------------------------

def growing_inputs(T=64, H=2, K=4, Vd=3, per_key=False):
    """g ~ 0 and large k, v: the plain state grows ~linearly in T (the collapse regime)."""
    torch.manual_seed(3)
    q = torch.randn(1, T, H, K)
    k = 3 + torch.rand(1, T, H, K)
    v = 3 + torch.rand(1, T, H, Vd)
    g = torch.full((1, T, H, K) if per_key else (1, T, H), -1e-3)
    return q, k, v, g


def run_cached(q, k, v, g, knobs, chunks, scale=0.5):
    """The decoding path of the shared helper over the given chunk lengths; returns o and the cache."""
    cache, outs, s = {}, [], 0
    for n in chunks:
        ctx = types.SimpleNamespace(doc_start=None, position_offset=s, knobs=knobs)
        gg = None if g is None else g[:, s:s + n]
        outs.append(recurrent.linear_attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], gg, scale=scale,
                                               ctx=ctx, cache=cache, key="S"))
        s += n
    return torch.cat(outs, 1), cache


def loop_reference(q, k, v, g, scale=0.5, decay_scale=1.0, cap=None):
    """Literal recurrence; with `cap`, each head's state is rescaled to norm <= cap after every token."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1])
    o = torch.zeros(B, T, H, v.shape[-1])
    for t in range(T):
        d = torch.exp(decay_scale * g[:, t])
        S = S * (d[..., None, None] if d.dim() == 2 else d[..., None]) + k[:, t, :, :, None] * v[:, t, :, None, :]
        if cap is not None:
            n = S.flatten(-2).norm(dim=-1)[..., None, None]
            S = torch.where(n > cap, S * cap / n, S)
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o


def window_reference(q, k, v, g, W, scale=0.5):
    """o_t from the state built from zero over the last W tokens (t-W, t] only."""
    o = torch.zeros(*q.shape[:3], v.shape[-1])
    for t in range(q.shape[1]):
        s = max(0, t - W + 1)
        o[:, t] = loop_reference(q[:, s:t + 1], k[:, s:t + 1], v[:, s:t + 1], g[:, s:t + 1], scale)[:, -1]
    return o


def test_neutral_knobs_are_bit_identical():
    for arch in ARCHS:
        model = tiny_model(arch).eval()
        ids = torch.randint(0, V, (2, 10))
        with torch.no_grad():
            base, _ = decode_logits(model, ids, 6)
            neutral, _ = decode_logits(model, ids, 6, InferenceKnobs(decay_scale=1.0, state_norm=None,
                                                                     state_window=None))
        assert torch.equal(base, neutral), arch
    q, k, v, g = growing_inputs(T=20)
    plain, _ = run_cached(q, k, v, g, None, [7, 1, 12])
    # a window longer than the stream subtracts an exactly-zero lagged read-out
    wide, _ = run_cached(q, k, v, g, InferenceKnobs(state_window=64), [7, 1, 12])
    assert torch.equal(plain, wide)


@pytest.mark.parametrize("per_key", [False, True])
def test_decay_scale_matches_reference_and_bounds_state(per_key):
    q, k, v, g = growing_inputs(per_key=per_key)
    plain, c0 = run_cached(q, k, v, g, None, [40, 1, 1, 22])
    scaled, c1 = run_cached(q, k, v, g, InferenceKnobs(decay_scale=200.0), [40, 1, 1, 22])
    torch.testing.assert_close(scaled, loop_reference(q, k, v, g, decay_scale=200.0), rtol=1e-4, atol=1e-3)
    kv_max = (k.norm(dim=-1) * v.norm(dim=-1)).max()
    bound = kv_max / (1 - math.exp(-0.2))                 # geometric sum with decay exp(200 * -1e-3)
    assert c1["S"].flatten(-2).norm(dim=-1).max() <= bound
    assert c0["S"].flatten(-2).norm(dim=-1).max() > 3 * bound      # it does grow without the knob


def test_mamba2_decay_scale_scales_only_the_decay():
    m = mixer(Mamba2, {"d_state": 8, "headdim": 8, "ngroups": 2})
    x = torch.randn(1, 9, 32)
    knobs = InferenceKnobs(decay_scale=0.3)
    cache, outs = {}, []
    with torch.no_grad():
        for s, e in [(0, 5)] + [(t, t + 1) for t in range(5, 9)]:
            outs.append(m(x[:, s:e], SeqContext(position_offset=s, knobs=knobs), cache))
        torch.testing.assert_close(torch.cat(outs, 1), ssd_reference(m, x, decay_scale=0.3), rtol=1e-4, atol=1e-5)
        assert (torch.cat(outs, 1) - ssd_reference(m, x)).abs().max() > 1e-3


def test_state_norm_caps_every_step_and_ignores_chunking():
    q, k, v, g = growing_inputs()
    cap = 25.0
    want = loop_reference(q, k, v, g, cap=cap)
    for chunks in ([64], [5, 1, 30, 1, 27]):
        o, cache = run_cached(q, k, v, g, InferenceKnobs(state_norm=cap), chunks)
        torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-3)
    cache, norms = {}, []
    for t in range(64):                                   # token by token: the cap holds after each step
        ctx = types.SimpleNamespace(doc_start=None, position_offset=t, knobs=InferenceKnobs(state_norm=cap))
        recurrent.linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], scale=0.5,
                                   ctx=ctx, cache=cache, key="S")
        norms.append(cache["S"].flatten(-2).norm(dim=-1).max().item())
    assert max(norms) <= cap * (1 + 1e-5)
    _, plain = run_cached(q, k, v, g, None, [64])
    assert plain["S"].flatten(-2).norm(dim=-1).max() > 10 * cap


@pytest.mark.parametrize("per_key", [False, True])
def test_state_window_is_the_last_w_tokens(per_key):
    q, k, v, g = growing_inputs(per_key=per_key)
    g = g - 0.01 * torch.rand_like(g)                     # uneven decays: Γ is a real product
    W = 8
    want = window_reference(q, k, v, g, W)
    for chunks in ([64], [3, 1, 1, 20, 7, 32], [1] * 64):
        o, cache = run_cached(q, k, v, g, InferenceKnobs(state_window=W), chunks)
        torch.testing.assert_close(o, want, rtol=1e-4, atol=2e-3)
        win = cache["S.win"]
        assert win["k"].shape[1] == W and win["v"].shape[1] == W     # bounded memory: W tokens + 2 states
    # the windowed state S_t - Γ_t S_{t-W} stays bounded by W terms; the plain state keeps growing
    gsum = win["g"].sum(1) if win["g"] is not None else 0.0
    gamma = torch.exp(torch.as_tensor(gsum))
    gamma = gamma[..., None, None] if gamma.dim() == 2 else gamma[..., None]
    eff = cache["S"] - gamma * win["lag"]
    kv_max = (k.norm(dim=-1) * v.norm(dim=-1)).max()
    assert eff.flatten(-2).norm(dim=-1).max() <= W * kv_max * 1.001
    assert cache["S"].flatten(-2).norm(dim=-1).max() > 3 * W * kv_max


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("knobs", [InferenceKnobs(decay_scale=2.5), InferenceKnobs(state_norm=1e-3),
                                   InferenceKnobs(state_window=4)], ids=["decay", "norm", "window"])
def test_knobs_reach_the_model_and_prefill_equals_decode(arch, knobs):
    model = tiny_model(arch).eval()
    randomize_(model)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        a, _ = decode_logits(model, ids, 9, knobs)        # chunks of 3, then single tokens
        b, _ = decode_logits(model, ids, 0, knobs)        # token by token from the start
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        plain, _ = decode_logits(model, ids, 9)
    if arch == "based" and knobs.decay_scale != 1.0:      # BASED has no decay to scale
        assert torch.equal(a, plain)
    else:
        assert (a - plain).abs().max() > 1e-4


def test_packed_documents_rejected_in_a_decoding_cache():
    model = tiny_model("gla").eval()
    ds = torch.zeros(1, 6, dtype=torch.bool)
    ds[0, 3] = True
    with pytest.raises(ValueError, match="document starts"):
        model(torch.randint(0, V, (1, 6)), SeqContext(doc_start=ds), cache=model.init_cache())
