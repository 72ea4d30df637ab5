"""Causal depthwise conv (full, varlen, state passing, step) and the Taylor feature map."""
import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels import causal_conv1d, causal_conv1d_step, taylor_feature_map


def conv_reference(x, weight, bias, history):
    """One sequence, explicit sum: x [T, D], history [W-1, D] (the inputs before x)."""
    W = weight.shape[1]
    full = torch.cat([history, x], 0)
    y = []
    for t in range(x.shape[0]):
        window = full[t:t + W]                        # inputs t-(W-1) .. t
        y.append((window * weight.t()).sum(0) + (0 if bias is None else bias))
    return torch.stack(y) if y else x.new_zeros(0, x.shape[1]), full[full.shape[0] - (W - 1):]


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_matches_reference(W, with_state):
    B, T, D = 2, 13, 5
    x, w, b = torch.randn(B, T, D), torch.randn(D, W), torch.randn(D)
    s0 = torch.randn(B, W - 1, D) if with_state else None
    y, fs = causal_conv1d(x, w, b, initial_state=s0, output_final_state=True)
    for i in range(B):
        hist = s0[i] if with_state else torch.zeros(W - 1, D)
        yr, fr = conv_reference(x[i], w, b, hist)
        torch.testing.assert_close(y[i], yr)
        torch.testing.assert_close(fs[i], fr)
    if W > 1 and not with_state:   # and the same as torch's conv1d with left zero padding
        yt = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w[:, None, :], b, groups=D).transpose(1, 2)
        torch.testing.assert_close(y, yt)


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_varlen(with_state):
    cu = [0, 2, 2, 3, 9, 15]     # a document shorter than W-1, an empty one, a length-1 one
    W, D = 4, 3
    x, w = torch.randn(1, cu[-1], D, dtype=torch.float64), torch.randn(D, W, dtype=torch.float64)
    s0 = torch.randn(len(cu) - 1, W - 1, D, dtype=torch.float64) if with_state else None
    y, fs = causal_conv1d(x, w, None, initial_state=s0, output_final_state=True, cu_seqlens=torch.tensor(cu))
    for d in range(len(cu) - 1):
        hist = s0[d] if with_state else torch.zeros(W - 1, D, dtype=torch.float64)
        yr, fr = conv_reference(x[0, cu[d]:cu[d + 1]], w, None, hist)
        torch.testing.assert_close(y[0, cu[d]:cu[d + 1]], yr)
        torch.testing.assert_close(fs[d], fr)


def test_conv_state_passing_and_step():
    B, T, D, W = 2, 11, 4, 4
    x, w, b = torch.randn(B, T, D), torch.randn(D, W), torch.randn(D)
    y, fs = causal_conv1d(x, w, b, output_final_state=True)
    y1, f1 = causal_conv1d(x[:, :6], w, b, output_final_state=True)
    y2, f2 = causal_conv1d(x[:, 6:], w, b, initial_state=f1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(f2, fs)
    state, ys = torch.zeros(B, W - 1, D), []
    for t in range(T):
        yt, state = causal_conv1d_step(x[:, t], state, w, b)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(state, fs)


def test_conv_gradients_flow():
    x = torch.randn(1, 10, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 10])
    f = lambda x, w, b, s0: causal_conv1d(x, w, b, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert torch.autograd.gradcheck(f, (x, w, b, s0))


def test_conv_bad_arguments():
    x = torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d(x, torch.randn(3, 4), initial_state=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        causal_conv1d(x, torch.randn(3, 4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="state must be"):
        causal_conv1d_step(x[:, 0], torch.zeros(1, 2, 3), torch.randn(3, 4))


@pytest.mark.parametrize("d", [1, 3, 16])
def test_taylor_feature_map_identity(d):
    q, k = torch.randn(7, d, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    pq, pk = taylor_feature_map(q), taylor_feature_map(k)
    assert pq.shape == (7, 1 + d + d * (d + 1) // 2)
    dot = (q * k).sum(-1)
    torch.testing.assert_close((pq * pk).sum(-1), 1 + dot / math.sqrt(d) + dot ** 2 / (2 * d))


def test_taylor_feature_map_shape_16():
    assert taylor_feature_map(torch.randn(2, 3, 4, 16)).shape == (2, 3, 4, 153)
