"""BASED (Arora et al. 2024): Taylor linear attention (letter B) and BaseConv (letter C); the third
BASED layer, sliding-window softmax attention, is the `swa` mixer (letter W, attention.py).

- Linear attention (HazyResearch/based `LinearAttention`): q, k projected to `feature_dim` (16) per
  head, v to head_dim = d_model / n_heads; `phi` = 2nd-order Taylor map (`kernels.taylor_feature_map`,
  `phi(q).phi(k) = 1 + qk/sqrt(d) + (qk)^2/2d`, 153 features); normalised output
  `o_t = phi(q_t) sum_s phi(k_s)^T v_s / (phi(q_t) sum_s phi(k_s)^T + eps)`. Numerator and normaliser
  are one primitive call: a column of ones is appended to v, so the normaliser is its last column.
- BaseConv (HazyResearch/based `convolution.BaseConv`): `u1, u2 = in_proj(x)` (d -> expand_proj d,
  halves of expand_proj d / 2), `y = out_proj(silu(conv(u1)) * u2)` with a short depthwise causal conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lctrain import kernels
from lctrain.models.base import Mixer, register_mixer, require_head_split
from lctrain.models.recurrent import causal_conv, chunked_flops, init_conv_, linear_attention
from lctrain.schema import require

TAYLOR_DIM = lambda d: 1 + d + d * (d + 1) // 2     # features of the (unique-term) 2nd-order Taylor map


@dataclass
class BasedConfig:
    n_heads: int = 16
    feature_dim: int = 16
    head_dim: int = 0                 # 0: d_model // n_heads
    eps: float = 1e-12

    def validate(self, path):
        require(self.n_heads > 0, f"{path}.n_heads", f"must be positive, got {self.n_heads}")
        require(self.feature_dim > 0, f"{path}.feature_dim", f"must be positive, got {self.feature_dim}")
        require(self.head_dim >= 0, f"{path}.head_dim", f"must be >= 0, got {self.head_dim}")

    def check_model(self, lm, path):
        require_head_split(self, lm, path)


@register_mixer
class BasedLinearAttention(Mixer):
    name, letter, Config = "based", "B", BasedConfig

    def __init__(self, d_model, config: BasedConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        c = config
        self.n_heads, self.feature_dim = c.n_heads, c.feature_dim
        self.head_dim = c.head_dim or d_model // c.n_heads
        self.proj_q = nn.Linear(d_model, c.n_heads * c.feature_dim, bias=False)
        self.proj_k = nn.Linear(d_model, c.n_heads * c.feature_dim, bias=False)
        self.proj_v = nn.Linear(d_model, c.n_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(c.n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        H, F_, Dh = self.n_heads, self.feature_dim, self.head_dim
        q = kernels.taylor_feature_map(self.proj_q(x).view(B, T, H, F_))
        k = kernels.taylor_feature_map(self.proj_k(x).view(B, T, H, F_))
        v = self.proj_v(x).view(B, T, H, Dh)
        v1 = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)       # last column -> the normaliser
        o = linear_attention(q, k, v1, None, scale=1.0, ctx=ctx, cache=cache, key="state")
        y = o[..., :Dh].float() / (o[..., Dh:].float() + self.config.eps)
        return self.out_proj(y.to(x.dtype).reshape(B, T, H * Dh))

    def flops_per_token(self, seq_len: int) -> float:
        return chunked_flops(self.n_heads, TAYLOR_DIM(self.feature_dim), self.head_dim + 1)

    def state_elements(self, seq_len: int) -> int:
        return self.n_heads * TAYLOR_DIM(self.feature_dim) * (self.head_dim + 1)


@dataclass
class BaseConvConfig:
    expand_proj: int = 4              # in_proj: d -> expand_proj * d, split into conv input and gate
    kernel_size: int = 3
    bias: bool = True                 # in_proj / out_proj biases (reference: use_bias=True)
    conv_bias: bool = False           # the reference's ShortConvolution has none

    def validate(self, path):
        require(self.expand_proj >= 2 and self.expand_proj % 2 == 0, f"{path}.expand_proj",
                f"must be an even number >= 2, got {self.expand_proj}")
        require(self.kernel_size >= 2, f"{path}.kernel_size", f"must be >= 2, got {self.kernel_size}")


@register_mixer
class BaseConv(Mixer):
    name, letter, Config = "baseconv", "C", BaseConvConfig

    def __init__(self, d_model, config: BaseConvConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        c = config
        self.d_inner = c.expand_proj * d_model // 2
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=c.bias)
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, c.kernel_size))
        self.conv_bias = nn.Parameter(torch.empty(self.d_inner)) if c.conv_bias else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=c.bias)
        self.init_weights()

    def init_weights(self):
        init_conv_(self.conv_weight, self.conv_bias)

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        u = causal_conv(u1, self.conv_weight, self.conv_bias, ctx, cache, "conv", activation="silu")
        return self.out_proj(u * u2)

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.d_inner * self.config.kernel_size + self.d_inner     # conv + gating product

    def state_elements(self, seq_len: int) -> int:
        return (self.config.kernel_size - 1) * self.d_inner
