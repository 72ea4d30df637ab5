"""Mamba-2 (SSD) mixer, letter M: the gated linear-attention primitive with `q = C, k = B, v = x dt,
g = A dt` (one decay per head), `scale = 1`, `y = o + D x` (DESIGN.md §2).

Layout follows mamba_ssm's `Mamba2` (no tensor parallelism): in_proj -> [z, x, B, C, dt]; a causal
depthwise conv (width d_conv) + SiLU over xBC; `dt = softplus(dt + dt_bias)`, `A = -exp(A_log)`;
B and C are shared by the `nheads / ngroups` heads of a group; gated RMSNorm `norm(y * silu(z))`
per group; out_proj.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctrain.models.base import Mixer, register_mixer
from lctrain.models.recurrent import causal_conv, chunked_flops, gated_rmsnorm, init_conv_, linear_attention
from lctrain.schema import require


@dataclass
class Mamba2Config:
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    d_conv: int = 4
    conv_bias: bool = True
    dt_min: float = 1e-3            # dt_bias init: inverse softplus of log-uniform [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])   # A_log = log U[a, b]

    def validate(self, path):
        for name in ("d_state", "headdim", "expand", "ngroups"):
            require(getattr(self, name) > 0, f"{path}.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.d_conv >= 2, f"{path}.d_conv", f"must be >= 2, got {self.d_conv}")
        require(0 < self.dt_min <= self.dt_max, f"{path}.dt_min", f"need 0 < dt_min <= dt_max, got "
                f"{self.dt_min}, {self.dt_max}")
        require(len(self.A_init_range) == 2 and 0 < self.A_init_range[0] <= self.A_init_range[1],
                f"{path}.A_init_range", f"must be [a, b] with 0 < a <= b, got {self.A_init_range}")

    def check_model(self, lm, path):
        d_inner = self.expand * lm.d_model
        require(d_inner % self.headdim == 0, f"{path}.headdim",
                f"must divide expand * d_model = {d_inner}, got {self.headdim}")
        require((d_inner // self.headdim) % self.ngroups == 0, f"{path}.ngroups",
                f"must divide the number of heads {d_inner // self.headdim}, got {self.ngroups}")


@register_mixer
class Mamba2(Mixer):
    name, letter, Config = "mamba2", "M", Mamba2Config

    def __init__(self, d_model, config: Mamba2Config, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        c = config
        self.d_inner = c.expand * d_model
        self.nheads = self.d_inner // c.headdim
        self.headdim, self.d_state, self.ngroups = c.headdim, c.d_state, c.ngroups
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state
        self.eps = lm.norm_eps
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, c.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim)) if c.conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.init_weights()

    def init_weights(self):
        c = self.config
        init_conv_(self.conv_weight, self.conv_bias)
        with torch.no_grad():
            # dt ~ log-uniform [dt_min, dt_max]; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
            u = torch.rand(self.nheads, device=self.dt_bias.device)
            dt = torch.exp(u * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
            dt = dt.clamp(min=c.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a, b = c.A_init_range
            self.A_log.copy_(torch.empty(self.nheads, device=self.A_log.device).uniform_(a, b).log())
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xbc = causal_conv(xbc, self.conv_weight, self.conv_bias, ctx, cache, "conv")
        xs, Bm, Cm = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(B, T, H, P)
        rep = H // G                       # heads h of group h // rep share B and C
        if G == 1:                         # a view (stride 0 over heads): the chunk path shares the scores
            k, q = Bm[:, :, None].expand(B, T, H, N), Cm[:, :, None].expand(B, T, H, N)
        else:
            k = Bm.reshape(B, T, G, N).repeat_interleave(rep, dim=2)
            q = Cm.reshape(B, T, G, N).repeat_interleave(rep, dim=2)
        dt = F.softplus(dt.float() + self.dt_bias.float())                  # [B, T, H]
        g = -torch.exp(self.A_log.float()) * dt                            # log-decay A dt <= 0
        v = (xs.float() * dt[..., None]).to(xs.dtype)
        o = linear_attention(q, k, v, g, scale=1.0, ctx=ctx, cache=cache, key="ssm")
        y = o.to(xs.dtype) + self.D.to(xs.dtype)[:, None] * xs
        y = gated_rmsnorm(y.reshape(B, T, self.d_inner), z, self.norm_weight, self.d_inner // G, self.eps,
                          norm_first=False)
        return self.out_proj(y)

    def flops_per_token(self, seq_len: int) -> float:
        conv = 2.0 * self.conv_dim * self.config.d_conv
        return conv + chunked_flops(self.nheads, self.d_state, self.headdim)

    def state_elements(self, seq_len: int) -> int:
        return self.nheads * self.d_state * self.headdim + (self.config.d_conv - 1) * self.conv_dim
