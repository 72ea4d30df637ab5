"""The LM skeleton and the softmax-attention mixers: decode = forward, documents isolated, attention
op vs its dense reference, activation checkpointing exact, config errors named."""
import pytest
import torch

from lctrain.kernels import attention, attention_reference
from lctrain.models import SeqContext, build_config, build_model
from lctrain.schema import ConfigError


def tiny(pattern="A", **mixers):
    return build_model(build_config({"arch": "transformer", "vocab_size": 97, "d_model": 48, "n_layers": 2,
                                     "pattern": pattern, "mixers": mixers or {"attention": {"n_heads": 4, "n_kv_heads": 2}}}))


@pytest.mark.parametrize("window", [None, 1, 5, 40])
@pytest.mark.parametrize("tq", [23, 7, 1])
def test_attention_matches_reference(window, tq):
    q = torch.randn(2, tq, 6, 16, dtype=torch.float64)
    k, v = torch.randn(2, 23, 3, 16, dtype=torch.float64), torch.randn(2, 23, 3, 16, dtype=torch.float64)
    got = attention(q, k, v, window=window, block_size=8)
    torch.testing.assert_close(got, attention_reference(q, k, v, window=window))


def test_attention_packed_documents_and_grads():
    cu = torch.tensor([0, 5, 6, 6, 20], dtype=torch.int32)      # includes a length-1 and an empty document
    q, k, v = (torch.randn(1, 20, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for window in (None, 3):
        out = attention(q, k, v, cu_seqlens=cu, window=window)
        ref = attention_reference(q, k, v, cu_seqlens=cu, window=window)
        torch.testing.assert_close(out, ref)
        g1 = torch.autograd.grad(out.square().sum(), (q, k, v))
        g2 = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    # a document equals running it alone
    alone = attention(q[:, 6:], k[:, 6:], v[:, 6:])
    torch.testing.assert_close(attention(q, k, v, cu_seqlens=cu)[:, 6:], alone)


def test_attention_bad_input():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="not divisible"):
        attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="more queries"):
        attention(torch.randn(1, 5, 3, 8), q, q)


@pytest.mark.parametrize("pattern, mixers", [
    ("A", {"attention": {"n_heads": 4, "n_kv_heads": 2}}),
    ("AW", {"swa": {"window": 6, "n_heads": 2}}),
])
def test_decode_equals_forward(pattern, mixers):
    model = tiny(pattern, **mixers).eval()
    x = torch.randint(0, 97, (2, 29))
    full = model(x).logits
    for chunk in (1, 4, 29):
        cache = model.init_cache()
        out = torch.cat([model(x[:, s:s + chunk], cache=cache).logits for s in range(0, 29, chunk)], 1)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    gen = model.generate(x[:, :10], 5)
    seq = x[:, :10]
    for _ in range(5):                       # greedy decoding by full forwards
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq[:, 10:])


def test_packed_documents_do_not_leak():
    model = tiny("AW", swa={"window": 6, "n_heads": 2}).eval()
    x = torch.randint(0, 97, (2, 30))
    starts = torch.zeros(2, 30, dtype=torch.bool)
    starts[0, 12] = True
    starts[1, 3] = True
    packed = model(x, SeqContext(doc_start=starts)).logits
    torch.testing.assert_close(packed[0, 12:], model(x[:1, 12:]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, 3:], model(x[1:, 3:]).logits[0], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[0, :12] = (x2[0, :12] + 1) % 97                                  # change document 1 only
    torch.testing.assert_close(model(x2, SeqContext(doc_start=starts)).logits[0, 12:], packed[0, 12:])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model(x).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_counts_and_tied_embeddings():
    model = tiny()
    d, v = 48, 97
    assert model.num_params() - model.num_params(non_embedding=True) == v * d     # tied: counted once
    assert model.flops_per_token(16) > 6 * model.num_params(non_embedding=True)
    assert model.state_elements(16) == 2 * 2 * 2 * 12 * 16                        # 2 layers of K,V: 2 kv heads x 12


@pytest.mark.parametrize("raw, field", [
    ({"pattern": "AZ"}, "model.pattern"),
    ({"n_layers": 3, "pattern": "AA"}, "model.pattern"),
    ({"mixers": {"atention": {}}}, "model.mixers.atention"),
    ({"mixers": {"attention": {"n_heads": 4, "n_kv_heads": 3}}}, "model.mixers.attention.n_kv_heads"),
    ({"mixers": {"swa": {"window": 0}}, "pattern": "W"}, "model.mixers.swa.window"),
])
def test_model_config_errors(raw, field):
    with pytest.raises(ConfigError) as e:
        build_config({"vocab_size": 10, **raw})
    assert str(e.value).startswith(field + ":")
