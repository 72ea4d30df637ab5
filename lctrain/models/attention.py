"""Softmax attention mixers: full causal (letter A) and sliding window (letter W), RoPE, GQA, KV cache.

Window convention: `window = W` lets query i see keys j with i - W < j <= i (W tokens counting the
query itself; flash-attn `window_size=(W-1, 0)`). The decoding cache keeps the last W-1 keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lctrain import kernels
from lctrain.models.base import Mixer, register_mixer, require_head_split
from lctrain.models.layers import apply_rope, rope_tables
from lctrain.schema import require


@dataclass
class AttentionConfig:
    n_heads: int = 4
    n_kv_heads: int = 0            # 0: same as n_heads (no GQA)
    head_dim: int = 0              # 0: d_model // n_heads
    rope_base: float = 10000.0
    window: Optional[int] = None   # sliding window W (see module doc); None = full causal

    def validate(self, path):
        require(self.n_heads > 0, f"{path}.n_heads", f"must be positive, got {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        require(kv > 0 and self.n_heads % kv == 0, f"{path}.n_kv_heads",
                f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        require(self.window is None or self.window >= 1, f"{path}.window", f"must be >= 1, got {self.window}")

    def check_model(self, lm, path):
        require_head_split(self, lm, path)


class QKVMixer(Mixer):
    """Heads, the fused q/k/v projection, RoPE and the output projection of softmax-attention mixers
    (full, sliding window, sparse global). `config` is an AttentionConfig (or a subclass)."""

    def __init__(self, d_model, config: AttentionConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        self.n_heads = config.n_heads
        self.n_kv = config.n_kv_heads or config.n_heads
        self.head_dim = config.head_dim or d_model // config.n_heads
        self.qkv_proj = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    def project(self, x: Tensor):
        """q [B,T,H,hd], k and v [B,T,H_kv,hd], before RoPE."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        return q.view(B, T, self.n_heads, hd), k.view(B, T, self.n_kv, hd), v.view(B, T, self.n_kv, hd)

    def rotate(self, q: Tensor, k: Tensor, position_offset: int):
        """RoPE at global positions position_offset + [0, T)."""
        pos = torch.arange(q.shape[1], device=q.device) + position_offset
        cos, sin = rope_tables(pos, self.head_dim, self.config.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@register_mixer
class Attention(QKVMixer):
    name, letter, Config = "attention", "A", AttentionConfig

    def __init__(self, d_model, config: AttentionConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        self.window = config.window

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.rotate(q, k, ctx.position_offset)
        if cache is None:
            o = ctx.ops.attention(q, k, v, doc_start=ctx.doc_start, window=self.window)
        else:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
            o = kernels.attention(q, k, v, causal=True, window=self.window)
            drop = 0 if self.window is None else max(0, k.shape[1] - (self.window - 1))
            cache["k"], cache["v"] = k[:, drop:], v[:, drop:]
        return self.out_proj(o.reshape(B, T, -1))

    def flops_per_token(self, seq_len: int) -> float:
        ctx_len = seq_len / 2 if self.window is None else min(self.window, seq_len)
        return 4.0 * self.n_heads * self.head_dim * ctx_len      # QK^T and PV, causal average

    def state_elements(self, seq_len: int) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * self.n_kv * self.head_dim * kept


@dataclass
class SlidingWindowConfig(AttentionConfig):
    window: Optional[int] = 64


@register_mixer
class SlidingWindowAttention(Attention):
    name, letter, Config = "swa", "W", SlidingWindowConfig
