"""Gated linear attention (Yang et al. 2023), letter G, as fla's `GatedLinearAttention` layer:
q, k: d -> expand_k d; v: d -> expand_v d; a low-rank data-dependent gate per key dimension
`g = logsigmoid(W2 W1 x + b) / gate_normalizer` (d -> gate_rank -> d_k); the primitive with
`scale = head_k_dim^-1/2`; per-head RMSNorm of the output times a swish output gate; out_proj.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctrain.models.base import Mixer, register_mixer
from lctrain.models.recurrent import chunked_flops, gated_rmsnorm, linear_attention
from lctrain.schema import require


@dataclass
class GLAConfig:
    n_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_rank: int = 16               # low-rank gate d -> gate_rank -> d_k
    gate_normalizer: float = 16.0     # g = logsigmoid(.) / gate_normalizer

    def validate(self, path):
        require(self.n_heads > 0, f"{path}.n_heads", f"must be positive, got {self.n_heads}")
        require(self.expand_k > 0 and self.expand_v > 0, f"{path}.expand_k",
                f"expand_k and expand_v must be positive, got {self.expand_k}, {self.expand_v}")
        require(self.gate_rank > 0, f"{path}.gate_rank", f"must be positive, got {self.gate_rank}")
        require(self.gate_normalizer >= 1, f"{path}.gate_normalizer", f"must be >= 1, got {self.gate_normalizer}")

    def check_model(self, lm, path):
        for name, e in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = lm.d_model * e
            require(dim == int(dim) and int(dim) % self.n_heads == 0, f"{path}.{name}",
                    f"{name} * d_model = {dim} must be an integer divisible by n_heads={self.n_heads}")


@register_mixer
class GatedLinearAttention(Mixer):
    name, letter, Config = "gla", "G", GLAConfig

    def __init__(self, d_model, config: GLAConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        c = config
        self.n_heads = c.n_heads
        self.key_dim, self.value_dim = int(d_model * c.expand_k), int(d_model * c.expand_v)
        self.head_k, self.head_v = self.key_dim // c.n_heads, self.value_dim // c.n_heads
        self.eps = lm.norm_eps
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)        # output gate (swish)
        self.gk_down = nn.Linear(d_model, c.gate_rank, bias=False)
        self.gk_up = nn.Linear(c.gate_rank, self.key_dim, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))           # shared by the heads (fla)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, self.head_k)
        k = self.k_proj(x).view(B, T, H, self.head_k)
        v = self.v_proj(x).view(B, T, H, self.head_v)
        g = F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.config.gate_normalizer
        o = linear_attention(q, k, v, g.view(B, T, H, self.head_k), scale=self.head_k ** -0.5,
                             ctx=ctx, cache=cache, key="state")
        gate = self.g_proj(x).view(B, T, H, self.head_v)
        o = gated_rmsnorm(o.to(x.dtype), gate, self.norm_weight, self.head_v, self.eps, norm_first=True)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def flops_per_token(self, seq_len: int) -> float:
        return chunked_flops(self.n_heads, self.head_k, self.head_v)

    def state_elements(self, seq_len: int) -> int:
        return self.n_heads * self.head_k * self.head_v
