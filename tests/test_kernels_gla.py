"""The GLA primitive: chunked torch path vs the token-by-token oracle, state passing, varlen,
the Mamba-2 mapping, the decode step and argument checks."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels import gated_linear_attention, gla_step
from lctrain.kernels import gla_chunk
from lctrain.kernels.gla_chunk import chunk_gla
from lctrain.kernels.testing import assert_backends_match, gla_inputs, run_with_grads

GATES = ["none", "head", "key"]
F64 = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_recurrent(gate, with_state):
    # T = 83: not a multiple of either chunk size (64, 16); K != V
    q, k, v, g, s0 = gla_inputs(2, 83, 2, 8, 5, gate, dtype=torch.float64, n_states=2 if with_state else None)
    ref = run_with_grads(q, k, v, g, s0, backend="recurrent")
    assert_backends_match(ref, run_with_grads(q, k, v, g, s0, backend="chunk"), **F64)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("decay", [0.1, 1.0, 10.0])
def test_chunk_decay_strengths(gate, decay):
    q, k, v, g, s0 = gla_inputs(1, 70, 2, 6, 7, gate, decay=decay, dtype=torch.float64, n_states=1)
    if g is not None and decay == 10.0:
        assert g.sum(1).max() < -50      # exp(+cumsum) of this would lose everything in fp32
    ref = run_with_grads(q, k, v, g, s0, backend="recurrent")
    assert_backends_match(ref, run_with_grads(q, k, v, g, s0, backend="chunk"), **F64)


@pytest.mark.parametrize("gate", GATES)
def test_chunk_strong_decay_fp32_finite(gate):
    q, k, v, g, s0 = gla_inputs(1, 200, 2, 16, 16, gate, decay=30.0, n_states=1)
    ref = run_with_grads(q, k, v, g, s0, backend="recurrent")
    assert_backends_match(ref, run_with_grads(q, k, v, g, s0, backend="chunk"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate", GATES)
def test_chunk_fp32_matches(gate):
    q, k, v, g, s0 = gla_inputs(1, 150, 2, 16, 32, gate, n_states=1)
    ref = run_with_grads(q.double(), k.double(), v.double(), None if g is None else g.double(), s0.double(),
                         backend="recurrent")
    out = run_with_grads(q, k, v, g, s0, backend="chunk")
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    ref = (ref[0].float(), ref[1].float(), {n: t.float() for n, t in ref[2].items()})
    assert_backends_match(ref, out, rtol=1e-4, atol=1e-3)


CU = [0, 5, 5, 6, 40, 41, 77]   # an empty document, two length-1 documents, boundaries off chunk edges


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_varlen_matches_recurrent(gate, with_state):
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v, g, s0 = gla_inputs(1, CU[-1], 2, 8, 6, gate, dtype=torch.float64,
                                n_states=len(CU) - 1 if with_state else None)
    ref = run_with_grads(q, k, v, g, s0, backend="recurrent", cu_seqlens=cu)
    out = run_with_grads(q, k, v, g, s0, backend="chunk", cu_seqlens=cu)
    assert_backends_match(ref, out, **F64)
    if with_state:   # the empty document's final state is its initial state
        torch.testing.assert_close(out[1][1], s0[1])


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("varlen", [False, True])
def test_chunk_blocks_of_chunks(gate, varlen, monkeypatch):
    # the chunk path walks the sequence in blocks of BLOCK_TOKENS; make blocks small enough to matter
    monkeypatch.setattr(gla_chunk, "BLOCK_TOKENS", 40)
    cu = torch.tensor(CU) if varlen else None
    n = len(CU) - 1 if varlen else 2
    q, k, v, g, s0 = gla_inputs(1 if varlen else 2, CU[-1], 2, 8, 6, gate, dtype=torch.float64, n_states=n)
    ref = run_with_grads(q, k, v, g, s0, backend="recurrent", cu_seqlens=cu)
    assert_backends_match(ref, run_with_grads(q, k, v, g, s0, backend="chunk", cu_seqlens=cu), **F64)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_varlen_equals_separate_calls(gate, backend):
    cu = torch.tensor(CU)
    q, k, v, g, s0 = gla_inputs(1, CU[-1], 2, 8, 6, gate, dtype=torch.float64, n_states=len(CU) - 1)
    o, fs = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                   backend=backend)
    for d in range(len(CU) - 1):
        a, b = CU[d], CU[d + 1]
        od, fd = gated_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b],
                                        initial_state=s0[d:d + 1], output_final_state=True, backend=backend)
        torch.testing.assert_close(o[:, a:b], od, **F64)
        torch.testing.assert_close(fs[d:d + 1], fd, **F64)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("split", [1, 37, 64])
def test_state_passing(gate, split):
    q, k, v, g, s0 = gla_inputs(2, 100, 2, 8, 4, gate, dtype=torch.float64, n_states=2)
    sl = lambda t, a, b: None if t is None else t[:, a:b]
    o, fs = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="chunk")
    o1, f1 = gated_linear_attention(sl(q, 0, split), sl(k, 0, split), sl(v, 0, split), sl(g, 0, split),
                                    initial_state=s0, output_final_state=True, backend="chunk")
    o2, f2 = gated_linear_attention(sl(q, split, 100), sl(k, split, 100), sl(v, split, 100),
                                    sl(g, split, 100), initial_state=f1, output_final_state=True,
                                    backend="chunk")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **F64)
    torch.testing.assert_close(f2, fs, **F64)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("chunk", [3, 8])
def test_chunk_gradcheck_fp64(gate, chunk, monkeypatch):
    # chunk 8 with per-key sub-blocks (4, 2): both nesting levels and the exact custom op
    monkeypatch.setattr(gla_chunk, "KEY_SUBS", (4, 2))
    q, k, v, g, s0 = gla_inputs(1, 19, 1, 3, 2, gate, dtype=torch.float64, n_states=2)
    cu = torch.tensor([0, 4, 19])
    inputs = [t.requires_grad_(True) for t in (q, k, v, s0)] + ([] if g is None else [g.requires_grad_(True)])

    def f(q, k, v, s0, g=None):
        o, fs = chunk_gla(q, k, v, g, 0.7, s0, True, cu, chunk_size=chunk)
        return o, fs

    assert torch.autograd.gradcheck(f, inputs)


def ssd_reference(x, dt, A, Bm, Cm):
    """Mamba-2 SSD in its quadratic form: y = (L o C B^T) (x dt) per head, L_ij = exp(sum_{j<s<=i} dt_s A).
    x [B, T, H, P], dt [B, T, H], A [H], Bm/Cm [B, T, G, N] shared by the H/G heads of a group."""
    H, G = x.shape[2], Bm.shape[2]
    Bh, Ch = Bm.repeat_interleave(H // G, 2), Cm.repeat_interleave(H // G, 2)
    a = dt * A                                                     # [B, T, H]
    cum = a.cumsum(1)
    seg = cum[:, :, None, :] - cum[:, None, :, :]                  # [B, i, j, H] = sum_{j<s<=i} a_s
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    L = torch.where(causal, seg, torch.tensor(float("-inf"), dtype=x.dtype)).exp()
    scores = torch.einsum("bihn,bjhn->bijh", Ch, Bh) * L
    return torch.einsum("bijh,bjhp->bihp", scores, x * dt[..., None])


@pytest.mark.parametrize("backend", ["recurrent", "chunk", "triton"])
def test_mamba2_mapping(backend):
    gen = torch.Generator().manual_seed(3)
    Bsz, T, H, G, P, N = 2, 90, 4, 2, 6, 8
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, Bm, Cm = r(Bsz, T, H, P), r(Bsz, T, G, N), r(Bsz, T, G, N)
    dt = F.softplus(r(Bsz, T, H) - 1)
    A = -torch.exp(r(H))
    expand = lambda t: t.repeat_interleave(H // G, 2)
    args = [expand(Cm), expand(Bm), x * dt[..., None], A * dt]
    tol = F64
    if backend == "triton":   # fp32 kernels (interpreter on CPU)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        args, tol = [a.to(dev, torch.float32) for a in args], dict(rtol=1e-4, atol=1e-4)
    o, _ = gated_linear_attention(*args, scale=1.0, backend=backend)
    torch.testing.assert_close(o.cpu().double(), ssd_reference(x, dt, A, Bm, Cm), **tol)


@pytest.mark.parametrize("gate", GATES)
def test_gla_step_iterated_equals_recurrent(gate):
    q, k, v, g, s0 = gla_inputs(2, 9, 3, 4, 5, gate, n_states=2)
    o, fs = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="recurrent")
    state, outs = s0, []
    for t in range(q.shape[1]):
        ot, state = gla_step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state)
        outs.append(ot)
    torch.testing.assert_close(torch.stack(outs, 1), o)
    torch.testing.assert_close(state, fs)
    assert state.dtype == torch.float32


def test_dtypes_and_defaults():
    q, k, v, g, _ = gla_inputs(1, 20, 2, 4, 4, "head", dtype=torch.bfloat16)
    o, fs = gated_linear_attention(q, k, v, g, output_final_state=True, backend="chunk")
    assert o.dtype == torch.bfloat16 and fs.dtype == torch.float32 and fs.shape == (1, 2, 4, 4)
    _, none = gated_linear_attention(q, k, v, g)
    assert none is None
    # scale defaults to K ** -0.5
    qf, kf, vf, gf = (t.float() for t in (q, k, v, g))
    o1, _ = gated_linear_attention(qf, kf, vf, gf, backend="chunk")
    o2, _ = gated_linear_attention(qf, kf, vf, gf, scale=0.5, backend="chunk")
    torch.testing.assert_close(o1, o2)


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.zeros(1, 8, 2, 3)), "k must be"),
    (dict(v=torch.zeros(1, 8, 3, 5)), "v must be"),
    (dict(g=torch.zeros(1, 8, 2, 5)), "g must be"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 9])), "cu_seqlens must be"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens must be"),
    (dict(backend="cuda"), "backend must be"),
])
def test_bad_arguments(bad, match):
    args = dict(q=torch.zeros(1, 8, 2, 4), k=torch.zeros(1, 8, 2, 4), v=torch.zeros(1, 8, 2, 5), g=None)
    args.update({n: bad.pop(n) for n in list(bad) if n in args})
    with pytest.raises(ValueError, match=match):
        gated_linear_attention(args["q"], args["k"], args["v"], args["g"], **bad)


def test_gla_step_bad_state():
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        gla_step(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), None, torch.zeros(1, 2, 4, 4))
