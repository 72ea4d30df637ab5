"""Hydra's two memories: a product-key memory (FFN letter P) and a causal workspace memory (mixer
letter R).

Product-key memory (Lample et al. 2019), `model.ffns.pkm`: a large table of n_sub_keys^2 values
addressed by product keys. Per head, the query (RMS-normalised; Lample's BatchNorm would couple the
sequences of a batch) is split in two halves; each half scores its own table of n_sub_keys sub-keys
and keeps its top_k; the top_k^2 sums of a pair of kept sub-key scores address the values
(index i1 * n_sub_keys + i2), and the output is the softmax over these top_k^2 candidates applied
to their values (an EmbeddingBag: the values are read sparsely, never materialised per token);
heads add up. Gated residual: y = sigmoid(w . x + b) * memory(x). It is position-wise, so it is an
FFN letter (it replaces an FFN, as in the paper): no sequence mixing, nothing to cache, documents
trivially separate. `inactive_params` counts the values a token does not read.

Workspace memory, `model.mixers.workspace`: n_slots slots of slot_dim numbers, written once per
completed chunk and read by every token; a mixer (it mixes along the sequence).
- Chunks: every document is cut into chunks of C tokens counted from its first token.
- Write, after chunk c is complete, from its summary u_c = mean over the chunk of W_in x (address
  a, value v, strength s): slot weights w = sigmoid(s) * softmax_m(K_m . a / sqrt(A)) over the
  learned slot addresses K, then W_c[m] = (1 - w_m) W_{c-1}[m] + w_m v (a convex update: slots stay
  bounded). Each document starts from the learned initial contents W_init.
- Read: a token of chunk c reads W_{c-1}, what the document's earlier chunks wrote (W_init in its
  first chunk), never its own chunk: multi-head attention over the slots with each head's part of
  the slot contents as keys and values, r = softmax_m(q . W[m] / sqrt(d_h)) W[m]; the output is
  out_proj(sigmoid(W_g x) * r). Perturbing token t changes nothing before the end of t's chunk.
- Cost per token: reads 4 n_slots slot_dim; writes ~ (2 A + 4 slot_dim) n_slots / C. The write
  recurrence runs over chunks (T / C steps).
- Sequence parallel: the per-token write inputs (A + slot_dim + 1 numbers) are gathered with
  `ctx.ops.gather_sequence`; every rank replays the chunk recurrence from the sequence start.
- Decoding cache: `state` (the slots after the last complete chunk) and `tail` (the write inputs of
  the incomplete chunk, < C tokens): O(1) in the sequence length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctrain.models.base import FFN_CONFIGS, FFNS, Mixer, register_mixer
from lctrain.models.hydra import doc_layout, runs, sequence_frame
from lctrain.models.recurrent import check_cache_docs
from lctrain.schema import require


# --- product-key memory -----------------------------------------------------------------------------

@dataclass
class PKMConfig:
    n_heads: int = 4
    n_sub_keys: int = 128      # sub-keys per half: n_sub_keys^2 values of d_model numbers
    key_dim: int = 256         # query size per head (two halves of key_dim / 2)
    top_k: int = 8             # sub-keys kept per half; softmax over top_k^2 candidates per head

    def validate(self, path):
        require(self.n_heads >= 1, f"{path}.n_heads", f"must be >= 1, got {self.n_heads}")
        require(self.key_dim >= 2 and self.key_dim % 2 == 0, f"{path}.key_dim",
                f"must be even and >= 2, got {self.key_dim}")
        require(1 <= self.top_k <= self.n_sub_keys, f"{path}.top_k",
                f"must be in [1, n_sub_keys={self.n_sub_keys}], got {self.top_k}")


class ProductKeyMemory(nn.Module):
    def __init__(self, d_model: int, config: PKMConfig, lm):
        super().__init__()
        self.config = config
        H, n, dk = config.n_heads, config.n_sub_keys, config.key_dim
        self.eps, self._std = lm.norm_eps, lm.init_std
        self.query = nn.Linear(d_model, H * dk, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(dk))
        self.sub_keys = nn.Parameter(torch.empty(H, 2, n, dk // 2))
        self.values = nn.Parameter(torch.empty(n * n, d_model))
        self.gate = nn.Linear(d_model, 1)
        for p in (self.sub_keys, self.values):     # embedding-like tables, read sparsely
            p._no_weight_decay = True
        self.init_weights()

    def init_weights(self):
        with torch.no_grad():
            # unit-norm-ish sub-keys: scores of a unit-RMS query half are ~N(0, 1)
            nn.init.normal_(self.sub_keys, std=(self.config.key_dim // 2) ** -0.5)
            nn.init.normal_(self.values, std=self._std)
            self.q_norm_weight.fill_(1.0)

    def inactive_params(self) -> int:
        c = self.config
        return (c.n_sub_keys ** 2 - min(c.n_sub_keys ** 2, c.n_heads * c.top_k ** 2)) * self.values.shape[1]

    def lookup(self, x: Tensor):
        """(value indices [B, T, H, k^2], softmax weights [B, T, H, k^2]) of every token and head."""
        c = self.config
        B, T, _ = x.shape
        q = self.query(x).float().view(B, T, c.n_heads, c.key_dim)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps) * self.q_norm_weight.float()
        q1, q2 = q.chunk(2, dim=-1)
        keys = self.sub_keys.float()
        s1, i1 = torch.einsum("bthd,hnd->bthn", q1, keys[:, 0]).topk(c.top_k, dim=-1)
        s2, i2 = torch.einsum("bthd,hnd->bthn", q2, keys[:, 1]).topk(c.top_k, dim=-1)
        scores = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
        idx = (i1[..., :, None] * c.n_sub_keys + i2[..., None, :]).flatten(-2)
        return idx, scores.softmax(-1)

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        B, T, D = x.shape
        idx, w = self.lookup(x)
        out = F.embedding_bag(idx.reshape(B * T, -1), self.values, mode="sum",
                              per_sample_weights=w.reshape(B * T, -1).to(self.values.dtype))
        return torch.sigmoid(self.gate(x)) * out.view(B, T, D).to(x.dtype)


FFN_CONFIGS["pkm"] = PKMConfig
FFNS["P"] = lambda d, cfg, i: ProductKeyMemory(d, cfg.ffns["pkm"], cfg)


# --- causal workspace memory ------------------------------------------------------------------------

@dataclass
class WorkspaceConfig:
    n_slots: int = 64
    slot_dim: int = 0          # 0: d_model
    n_heads: int = 4           # read heads; each reads its slot_dim / n_heads part of every slot
    addr_dim: int = 64         # A: size of the write addresses
    chunk_size: int = 64       # C: tokens per written chunk

    def validate(self, path):
        for name in ("n_slots", "n_heads", "addr_dim", "chunk_size"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.slot_dim >= 0, f"{path}.slot_dim", f"must be >= 0, got {self.slot_dim}")

    def check_model(self, lm, path):
        s = self.slot_dim or lm.d_model
        require(s % self.n_heads == 0, f"{path}.n_heads", f"must divide slot_dim={s}")


@register_mixer
class WorkspaceMemory(Mixer):
    name, letter, Config = "workspace", "R", WorkspaceConfig

    def __init__(self, d_model, config: WorkspaceConfig, layer_idx, lm):
        super().__init__(d_model, config, layer_idx, lm)
        c = config
        self.S, self.A, self.M = c.slot_dim or d_model, c.addr_dim, c.n_slots
        # per-token write inputs [address, value, strength]; a chunk's summary is their mean
        self.write_proj = nn.Linear(d_model, self.A + self.S + 1, bias=False)
        self.slot_keys = nn.Parameter(torch.empty(self.M, self.A))
        self.slot_init = nn.Parameter(torch.empty(self.M, self.S))
        for p in (self.slot_keys, self.slot_init):
            p._no_weight_decay = True
        self.q_proj = nn.Linear(d_model, self.S, bias=False)
        self.gate_proj = nn.Linear(d_model, self.S, bias=False)
        self.out_proj = nn.Linear(self.S, d_model, bias=False)
        self.init_weights()

    def init_weights(self):
        nn.init.normal_(self.slot_keys)
        nn.init.normal_(self.slot_init)

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        H = self.config.n_heads
        C = self.config.chunk_size
        p = self.write_proj(x)
        q = self.q_proj(x).view(B, T, H, self.S // H)
        if cache is None:
            (pf,), ds, q_off = sequence_frame(ctx, T, p)
            starts, rel, _ = doc_layout(ds, B, pf.shape[1], x.device)
            init = None
        else:   # the frame (cached tail + new tokens) starts at a chunk boundary, mid-document
            check_cache_docs(ctx)
            pf = p if "tail" not in cache else torch.cat([cache["tail"], p], 1)
            q_off = pf.shape[1] - T
            starts = torch.zeros(B, pf.shape[1], dtype=torch.bool, device=x.device)
            rel = torch.arange(pf.shape[1], device=x.device).expand(B, -1)
            init = cache.get("state")
        r, final = self.read(pf, starts, rel, q, q_off, init)
        if cache is not None:
            cache["state"] = final
            cache["tail"] = pf[:, (pf.shape[1] // C) * C:].detach()
        return self.out_proj(torch.sigmoid(self.gate_proj(x)) * r.reshape(B, T, self.S).to(x.dtype))

    def read(self, pf: Tensor, starts: Tensor, rel: Tensor, q: Tensor, q_off: int, init: Optional[Tensor]):
        """Reads [B, T, H, d_h] of the queries at frame positions q_off + [0, T), and the slots after
        the frame's last complete chunk. pf: write inputs of the frame [B, F, A + S + 1]; a chunk
        that starts a document (starts) begins from slot_init, the frame's first one from `init`."""
        c = self.config
        C, M, S, A = c.chunk_size, self.M, self.S, self.A
        B, F_, _ = pf.shape
        T, H, dh = q.shape[1], q.shape[2], q.shape[3]
        rid, first, length = runs(starts, rel, C)
        N = first.shape[1]
        u = pf.float().new_zeros(B, N, pf.shape[2]).scatter_add_(
            1, rid[..., None].expand(-1, -1, pf.shape[2]), pf.float()) / C
        addr, val, strength = u.split([A, S, 1], dim=-1)
        w = torch.sigmoid(strength) * torch.softmax(addr @ self.slot_keys.float().t() / math.sqrt(A), -1)
        w = w * (length == C)[..., None]                                 # incomplete chunks write nothing
        reset = starts.gather(1, first.clamp(max=F_ - 1))               # [B, N]
        W0 = self.slot_init.float().expand(B, M, S)
        state = W0 if init is None else init.float()
        before = []
        for j in range(N):
            state = torch.where(reset[:, j, None, None], W0, state)
            before.append(state)
            state = state + w[:, j, :, None] * (val[:, j, None, :] - state)
        before = torch.stack(before, 1)                                  # [B, N, M, S]

        # Reads: local tokens laid out by (chunk, position in chunk) so a chunk's tokens share its slots.
        lrid = rid[:, q_off:]
        lc = lrid - lrid[:, :1]
        nl = int(lc.max()) + 1
        pin = rel[:, q_off:] % C
        chunk_ids = (lrid[:, :1] + torch.arange(nl, device=q.device)).clamp(max=N - 1)
        slots = before.gather(1, chunk_ids[..., None, None].expand(-1, -1, M, S)).view(B, nl, M, H, dh)
        bi = torch.arange(B, device=q.device)[:, None].expand(B, T)
        qp = q.float().new_zeros(B, nl, C, H, dh).index_put((bi, lc, pin), q.float())
        att = torch.einsum("bnchd,bnmhd->bnchm", qp, slots).div(math.sqrt(dh)).softmax(-1)
        r = torch.einsum("bnchm,bnmhd->bnchd", att, slots)[bi, lc, pin]
        return r, state

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return 4.0 * self.M * self.S + (2.0 * self.A + 4.0 * self.S) * self.M / c.chunk_size

    def state_elements(self, seq_len: int) -> int:
        return self.M * self.S + (self.config.chunk_size - 1) * (self.A + self.S + 1)
