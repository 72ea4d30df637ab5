"""Fused / fast paths against their readable references: values and gradients (fp64).

- short_conv (conv + SiLU with a hand-written backward, document masks) vs causal_conv1d + silu;
- the chunk path with q and k shared by every head (Mamba-2, one group) vs the token-by-token oracle;
- the automatic chunk of short sequences (seq_len below 64) vs the oracle;
- softmax attention over rows holding several documents (per-row masks) vs the dense oracle per row.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain import kernels
from lctrain.kernels.gla_chunk import MIN_CHUNK, _auto_chunk
from lctrain.models.seqops import doc_cu_seqlens, doc_offsets

f64 = torch.float64


def _grads(fn, inputs):
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out if o is not None)
    return [o.detach() for o in out if o is not None], torch.autograd.grad(loss, inputs)


def _assert_same(a, b, tol=1e-10):
    (oa, ga), (ob, gb) = a, b
    for x, y in zip(oa + list(ga), ob + list(gb)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_matches_reference(W, docs, activation, bias):
    B, T, D = 3, 19, 6
    gen = torch.Generator().manual_seed(W)
    x = torch.randn(B, T, D, dtype=f64, generator=gen, requires_grad=True)
    w = torch.randn(D, W, dtype=f64, generator=gen, requires_grad=True)
    b = torch.randn(D, dtype=f64, generator=gen, requires_grad=True) if bias else None
    ds = torch.zeros(B, T, dtype=torch.bool)
    if docs:
        ds[0, [1, 2, 9]] = True          # a one-token document, a start right after another
        ds[2, [5, 17]] = True
    leaves = [x, w] + ([b] if bias else [])

    def fused(x, w, b=None):
        return kernels.short_conv(x, w, b, offsets=doc_offsets(ds) if docs else None, activation=activation)

    def reference(x, w, b=None):
        cu = doc_cu_seqlens(ds, B, T, x.device)
        y, _ = kernels.causal_conv1d(x.reshape(1, B * T, D), w, b, cu_seqlens=cu)
        y = y.reshape(B, T, D)
        return F.silu(y) if activation == "silu" else y

    _assert_same(_grads(fused, leaves), _grads(reference, leaves))


def test_doc_offsets():
    ds = torch.tensor([[False, False, True, False, True], [True, False, False, False, False]])
    assert doc_offsets(ds).tolist() == [[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_chunk_path_with_shared_qk_matches_oracle(varlen, init):
    """q, k expanded over the heads (stride 0) take _block_shared; several blocks of chunks, padding,
    documents (one empty) and initial states."""
    B, T, H, K, V = 2, 1100, 3, 8, 5
    gen = torch.Generator().manual_seed(int(varlen) * 2 + int(init))
    q1, k1 = (torch.randn(B, T, 1, K, dtype=f64, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=f64, generator=gen)
    g = -torch.rand(B, T, H, dtype=f64, generator=gen)
    cu = None
    if varlen:
        q1, k1, v, g = (x.reshape(1, B * T, *x.shape[2:]) for x in (q1, k1, v, g))
        cu = torch.tensor([0, 7, 7, 100, 1170, 2200])
    N = 5 if varlen else B
    s0 = torch.randn(N, H, K, V, dtype=f64, generator=gen) if init else None
    leaves = [t.requires_grad_(True) for t in (q1, k1, v, g)]
    Bb, Tt = q1.shape[:2]

    def run(backend, expand):
        def fn(q1, k1, v, g):
            q, k = q1.expand(Bb, Tt, H, K), k1.expand(Bb, Tt, H, K)
            if not expand:
                q, k = q.contiguous(), k.contiguous()
            return kernels.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,
                                                  cu_seqlens=cu, backend=backend)
        return fn

    _assert_same(_grads(run("chunk", True), leaves), _grads(run("recurrent", False), leaves))


@pytest.mark.parametrize("gate", ["none", "head", "key"])
@pytest.mark.parametrize("T", [1, 5, 16, 33])
def test_short_sequences_use_a_short_chunk(gate, T):
    from lctrain.kernels.testing import gla_inputs
    q, k, v, g, _ = gla_inputs(3, T, 2, 8, 4, gate, dtype=f64)
    leaves = [t.requires_grad_(True) for t in (q, k, v) + ((g,) if g is not None else ())]
    fn = lambda backend: (lambda *a: kernels.gated_linear_attention(*a, backend=backend, output_final_state=True))
    _assert_same(_grads(fn("chunk"), leaves), _grads(fn("recurrent"), leaves))
    assert _auto_chunk(64, T, None) == max(MIN_CHUNK, 1 << (T - 1).bit_length())
    assert _auto_chunk(64, 4096, torch.tensor([0, 10, 4096])) == 64
    assert _auto_chunk(64, 4096, torch.tensor([0, 10, 20, 30])) == MIN_CHUNK



@pytest.mark.parametrize("window", [None, 7])
def test_attention_with_documents_per_row_matches_reference(window):
    from lctrain.models.seqops import LOCAL_OPS
    B, T, H, Hkv, D = 3, 20, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, dtype=f64, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, D, dtype=f64, generator=gen, requires_grad=True) for _ in range(2))
    ds = torch.zeros(B, T, dtype=torch.bool)
    ds[0, [3, 4, 15]] = True
    ds[2, 9] = True

    def reference(q, k, v):
        rows = [kernels.attention_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], window=window,
                                            cu_seqlens=doc_cu_seqlens(ds[b:b + 1], 1, T, q.device))
                for b in range(B)]
        return torch.cat(rows, 0)

    fast = lambda q, k, v: LOCAL_OPS.attention(q, k, v, doc_start=ds, window=window)
    _assert_same(_grads(fast, [q, k, v]), _grads(reference, [q, k, v]))
