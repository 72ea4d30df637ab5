"""Sparse global attention, letter X: a sliding window plus top-k blocks chosen per query (NSA-style
block selection, Yuan et al. 2025), for Hydra's intermittent global layers.

Definition, for a query token i of a document (W = window, L = block_size, k = top_k):
- Blocks: every document is cut into consecutive blocks of L tokens counted from its first token. A
  block's summary is the mean of its keys (before RoPE, so selection is by content, not distance).
- Candidates of i: the complete blocks of i's document that end at or before i and are not covered
  by i's window (first token <= i - W). Selection: i scores each candidate by q_i . summary and keeps
  the k best (with GQA the query heads of a KV group add their scores, so a group shares its blocks
  and a kernel loads each selected block once per group).
- Output: causal softmax attention of i (RoPE, scale D^-1/2) over the union of its window
  {j : i - W < j <= i} and the keys of its selected blocks, all inside its document. No future token
  and no other document is ever read. Window convention as attention.py (W counts the query).
- The selection is a discrete choice: its scores get no gradient (as NSA's selection branch); q and
  k learn through the attention itself.
With k >= (number of blocks) and W >= L this is exactly full causal attention; with k = 0 it is
sliding-window attention (letter W).

Cost per token (T tokens, H heads, H_kv KV heads, head dim D): selection ~ 2 H_kv D (T / 2L)
(scores against the complete blocks: quadratic in T with a 1/L factor, like NSA's compressed branch)
plus attention 4 H D (W + k L) (linear in T). See `flops_per_token`.

Training path (the reference for a fused kernel): keys and values are laid out block-major once
(O(T)); queries are processed `query_chunk` at a time, and each chunk is recomputed in the backward
pass (activation checkpointing), so memory stays O(T) instead of O(T k L). A chunk whose queries
chose few distinct blocks (<= UNION_FACTOR * k, the common case: neighbours agree) scores them all
with one matmul and masks; otherwise each query copies its own k blocks. Sequence parallel: local queries attend over K/V gathered with `ctx.ops.gather_sequence`
at their global causal offset (like LASP-2H; O(T) comm and memory for K, V); block summaries come
from the gathered pre-RoPE keys (one gather of [rotated k, v, pre-RoPE k]).

Decoding cache (`k`, `v`: rotated keys / values of every token, as any complete block may be
selected; `summ`: summaries of complete blocks; `tail`: pre-RoPE keys of the incomplete block):
chunked prefill and token-by-token decoding run the same selection and attention as the full forward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lctrain.models.attention import AttentionConfig, QKVMixer
from lctrain.models.base import register_mixer
from lctrain.models.hydra import doc_layout, runs, sequence_frame
from lctrain.models.recurrent import check_cache_docs
from lctrain.schema import require


@dataclass
class SparseAttentionConfig(AttentionConfig):
    window: int = 256              # local window W (query i sees i - W < j <= i)
    block_size: int = 64           # L: tokens per selectable block
    top_k: int = 8                 # blocks selected per query (per KV head)
    query_chunk: int = 64          # queries processed together (memory only; results do not depend on it)

    def validate(self, path):
        super().validate(path)
        require(self.block_size >= 1, f"{path}.block_size", f"must be >= 1, got {self.block_size}")
        require(self.top_k >= 0, f"{path}.top_k", f"must be >= 0, got {self.top_k}")
        require(self.query_chunk >= 1, f"{path}.query_chunk", f"must be >= 1, got {self.query_chunk}")


# A query chunk whose queries chose at most UNION_FACTOR * top_k distinct blocks scores all of them
# densely (one matmul, masked); otherwise each query gathers its own top_k blocks. Same results.
UNION_FACTOR = 4


def to_blocks(x: Tensor, rid: Tensor, pin: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """Block-major copy [B, N, L, H, D] of a frame tensor x [B, F, H, D]: token f goes to block rid[f],
    slot pin[f] (incomplete blocks are zero-padded)."""
    B, F = rid.shape
    bi = torch.arange(B, device=x.device)[:, None].expand(B, F)
    return x.new_zeros(B, n_blocks, block_size, *x.shape[2:]).index_put((bi, rid, pin), x)


def block_sparse_attention(q: Tensor, q_sel: Tensor, k: Tensor, v: Tensor, seg: Tensor, kb: Tensor,
                           vb: Tensor, summ: Tensor, bstart: Tensor, bseg: Tensor, bvalid: Tensor, *,
                           window: int, top_k: int, q_offset: int, scale: Optional[float] = None,
                           query_chunk: int = 64) -> Tensor:
    """The attention defined in the module doc, for queries at key-frame positions q_offset + [0, Tq).

    q [B, Tq, H, D] (rotated), q_sel [B, Tq, Hkv, D] (selection queries: pre-RoPE, summed over the
    group), k, v [B, Tk, Hkv, D] (rotated keys), seg [B, Tk] document number of each key; blocks:
    kb, vb [B, N, L, Hkv, D] (their keys and values), summ [B, N, Hkv, D] (mean pre-RoPE keys),
    bstart / bseg / bvalid [B, N] (first key, document, complete).
    """
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                     # [B, Hkv, Tk, D]
    # rows of L * D contiguous numbers, one per (row, head, block): index_select copies whole blocks
    kb, vb = (t.permute(0, 3, 1, 2, 4).reshape(-1, t.shape[2] * t.shape[4]) for t in (kb, vb))
    summ = summ.detach().float().transpose(1, 2)                      # [B, Hkv, N, D]
    fn = functools.partial(_query_chunk, window=window, top_k=top_k, scale=scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, kb, vb))
    outs = []
    for q0 in range(0, q.shape[1], query_chunk):
        args = (q[:, q0:q0 + query_chunk], q_sel[:, q0:q0 + query_chunk].detach(), kh, vh, seg, kb, vb,
                summ, bstart, bseg, bvalid, q_offset + q0)
        # recomputed in the backward pass: the gathered blocks (n * top_k * L keys) are never stored
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return torch.cat(outs, 1)


def _query_chunk(q, q_sel, kh, vh, seg, kb, vb, summ, bstart, bseg, bvalid, q_start: int, *, window, top_k,
                 scale):
    B, n, H, D = q.shape
    Hkv, N = kh.shape[1], summ.shape[2]
    L = kb.shape[1] // D
    G, dev = H // Hkv, q.device
    qpos = torch.arange(n, device=dev) + q_start                      # key-frame positions
    qseg = seg[:, qpos]                                               # [B, n]
    qg = q.reshape(B, n, Hkv, G, D).permute(0, 2, 3, 1, 4)            # [B, Hkv, G, n, D]

    # Local window: the key band [q_start - W + 1, q_start + n), masked per query.
    lo, hi = max(0, q_start - window + 1), q_start + n
    kpos = torch.arange(lo, hi, device=dev)
    wmask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
    wmask = wmask[None] & (seg[:, lo:hi][:, None, :] == qseg[:, :, None])            # [B, n, Lw]
    scores = [torch.einsum("bhgqd,bhkd->bhgqk", qg, kh[:, :, lo:hi]).float() * scale]
    scores[0] = scores[0].masked_fill(~wmask[:, None, None], float("-inf"))

    kk = min(top_k, N)
    if kk > 0:
        with torch.no_grad():
            cand = (bvalid[:, None, :] & (bseg[:, None, :] == qseg[:, :, None])
                    & (bstart[:, None, :] + (L - 1) <= qpos[None, :, None])
                    & (bstart[:, None, :] <= qpos[None, :, None] - window))            # [B, n, N]
            sel = torch.einsum("bqhd,bhnd->bhqn", q_sel.float(), summ)
            sel = sel.masked_fill(~cand[:, None], float("-inf"))
            top, idx = sel.topk(kk, dim=-1)                                            # [B, Hkv, n, kk]
            found = torch.isfinite(top)
            used = torch.unique(idx[found])                                            # blocks any query chose
        if used.numel() <= UNION_FACTOR * kk:
            # few distinct blocks (neighbouring queries mostly agree): score all of them with one
            # matmul and mask, rather than copying every query's own blocks
            with torch.no_grad():
                pick = ((idx[..., None] == used) & found[..., None]).any(-2)             # [B, Hkv, n, u]
                keys = bstart[:, used, None] + torch.arange(L, device=dev)             # [B, u, L]
                ok = pick[..., None] & (qpos[None, :, None, None] - keys[:, None] >= window)[:, None]
                rows = (torch.arange(B * Hkv, device=dev)[:, None] * N + used).flatten()
            m = used.numel() * L
            ks = kb.index_select(0, rows).view(B, Hkv, m, D)
            vs = vb.index_select(0, rows).view(B, Hkv, m, D)
            s = torch.einsum("bhgqd,bhkd->bhgqk", qg, ks).float() * scale
            pv = "bhgqk,bhkd->bhgqd"
        else:
            with torch.no_grad():
                keys = torch.gather(bstart[:, None, None, :].expand(B, Hkv, n, N), -1, idx)[..., None] \
                    + torch.arange(L, device=dev)                                      # [B, Hkv, n, kk, L]
                ok = found[..., None] & (qpos[None, None, :, None, None] - keys >= window)
                rows = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1) * N + idx).flatten()
            m = kk * L
            ks = kb.index_select(0, rows).view(B, Hkv, n, m, D)
            vs = vb.index_select(0, rows).view(B, Hkv, n, m, D)
            s = torch.einsum("bhgqd,bhqmd->bhgqm", qg, ks).float() * scale
            pv = "bhgqm,bhqmd->bhgqd"
        # keys of a selected block inside the window are already attended through the window (ok)
        scores.append(s.masked_fill(~ok.reshape(B, Hkv, 1, n, m), float("-inf")))
    p = torch.cat(scores, -1).softmax(-1).to(vh.dtype)                # every query sees itself
    Lw = hi - lo
    o = torch.einsum("bhgqk,bhkd->bhgqd", p[..., :Lw], vh[:, :, lo:hi])
    if kk > 0:
        o = o + torch.einsum(pv, p[..., Lw:], vs)
    return o.permute(0, 3, 1, 2, 4).reshape(B, n, H, D)


@register_mixer
class SparseGlobalAttention(QKVMixer):
    name, letter, Config = "sparse_attention", "X", SparseAttentionConfig

    def forward(self, x: Tensor, ctx, cache: Optional[dict] = None) -> Tensor:
        B, T, _ = x.shape
        c, hd, H, Hkv = self.config, self.head_dim, self.n_heads, self.n_kv
        L = c.block_size
        q, k, v = self.project(x)
        qr, kr = self.rotate(q, k, ctx.position_offset)
        q_sel = q.view(B, T, Hkv, H // Hkv, hd).sum(3)
        if cache is None:
            # one gather (under SP) of [rotated k, v, pre-RoPE k]; the last part only feeds the selection
            (kvk,), ds, q_off = sequence_frame(ctx, T, torch.cat([kr, v, k.detach()], -1))
            kf, vf, kraw = kvk.split(hd, dim=-1)
            F = kf.shape[1]
            starts, rel, seg = doc_layout(ds, B, F, x.device)
            rid, bstart, length = runs(starts, rel, L)
            N, pin = bstart.shape[1], rel % L
            kb, vb = to_blocks(kf, rid, pin, N, L), to_blocks(vf, rid, pin, N, L)
            summ = to_blocks(kraw, rid, pin, N, L).sum(2) / L
            bseg, bvalid = seg.gather(1, bstart.clamp(max=F - 1)), length == L
        else:
            check_cache_docs(ctx)
            kf = kr if "k" not in cache else torch.cat([cache["k"], kr], 1)
            vf = v if "v" not in cache else torch.cat([cache["v"], v], 1)
            raw = k.detach() if "tail" not in cache else torch.cat([cache["tail"], k.detach()], 1)
            full = raw.shape[1] // L
            summ = cache.get("summ", k.new_zeros(B, 0, Hkv, hd))
            if full:    # blocks completed by these tokens (same summation as the training path)
                summ = torch.cat([summ, raw[:, :full * L].reshape(B, full, L, Hkv, hd).sum(2) / L], 1)
            cache.update(k=kf, v=vf, summ=summ, tail=raw[:, full * L:])
            F, N = kf.shape[1], summ.shape[1]
            q_off = F - T
            kb, vb = kf[:, :N * L].view(B, N, L, Hkv, hd), vf[:, :N * L].view(B, N, L, Hkv, hd)
            seg = torch.zeros(B, F, dtype=torch.long, device=x.device)
            bstart = (torch.arange(N, device=x.device) * L).expand(B, N)
            bseg = torch.zeros(B, N, dtype=torch.long, device=x.device)
            bvalid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        o = block_sparse_attention(qr, q_sel, kf, vf, seg, kb, vb, summ, bstart, bseg, bvalid, window=c.window,
                                   top_k=c.top_k, q_offset=q_off, query_chunk=c.query_chunk)
        return self.out_proj(o.reshape(B, T, -1))

    def _keys_per_query(self, seq_len: int):
        """(mean attended keys, mean candidate blocks) over the positions of a seq_len-token document."""
        c, L = self.config, self.config.block_size
        i = torch.arange(seq_len, device="cpu", dtype=torch.float64)
        cand = torch.minimum(torch.floor((i + 1) / L), torch.floor((i - c.window) / L) + 1).clamp(min=0)
        keys = torch.clamp(i + 1, max=c.window) + torch.clamp(cand, max=c.top_k) * L
        return float(keys.mean()), float(cand.mean())

    def flops_per_token(self, seq_len: int) -> float:
        keys, cand = self._keys_per_query(seq_len)
        return 4.0 * self.n_heads * self.head_dim * keys + 2.0 * self.n_kv * self.head_dim * cand

    def state_elements(self, seq_len: int) -> int:
        per_token = self.n_kv * self.head_dim
        return 2 * per_token * seq_len + per_token * (seq_len // self.config.block_size + seq_len % self.config.block_size)
