"""Feature maps for linear attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def taylor_feature_map(x: Tensor) -> Tensor:
    """BASED 2nd-order Taylor map: [..., d] -> [..., 1 + d + d(d+1)/2] (16 -> 153) with
    `phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)` exactly.

    Only the unique products x_i x_j (i <= j) are kept; off-diagonal ones appear twice in (q.k)^2,
    so they carry weight sqrt(2) (folded into the 1/sqrt(2d) factor: 1/sqrt(d) instead).
    """
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"taylor_feature_map: x must be [..., d] with d >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    w = torch.where(i == j, 1.0 / math.sqrt(2 * d), 1.0 / math.sqrt(d)).to(x.dtype)
    second = x[..., i] * x[..., j] * w
    return torch.cat([torch.ones_like(x[..., :1]), x * d ** -0.25, second], dim=-1)
