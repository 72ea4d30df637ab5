"""Chunked gated linear attention in torch: the fast CPU path (autograd does the backward).

Per chunk of C tokens with in-chunk inclusive cumulative log-decay `b` (so `b` is non-increasing):
    intra:  o_i += sum_{j<=i} (q_i . k_j exp(b_i - b_j)) v_j          exponents <= 0 (relative decay)
    inter:  o_i += (q_i exp(b_i)) S_in                                 exponent <= 0
    state:  S_out = exp(b_last) S_in + sum_j (k_j exp(b_last - b_j))^T v_j
Nothing is ever divided by a decay, so strong decay underflows to 0 instead of overflowing.
Per-key-dim gates need the decay for every (i, j, key) triple: the 64-row chunk is split into 16-row
and then 4-row sub-blocks; off-diagonal sub-blocks are matmuls around a reference row, the smallest
diagonal ones exact, by a small custom op that recomputes the decays in its backward (memory O(T K),
not O(T C K)). The chunks are processed in blocks of BLOCK_TOKENS so each op's working set stays
cache-sized at any T; the only Python loop is the state pass over chunks.
Documents (cu_seqlens) are chunked independently (see layout.py): no loop over documents.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from lctrain.kernels.layout import build_layout, from_chunks, to_chunks

BLOCK_TOKENS = 1024          # tokens per block of chunks (cache-sized work units)
KEY_CHUNK, KEY_SUBS = 64, (16, 4)  # per-key-dim gates: chunk and nested sub-blocks (exact at the last)
MIN_CHUNK = 16            # smallest automatic chunk (rows shorter than a chunk are padded to it)
_GROUP_ELEMS = 1 << 22   # bound on the [G, C, C, K] decay tensor materialised at once


def _decay_pairs(bi: Tensor, bj: Tensor, mask: Tensor) -> Tensor:
    """exp(b_i - b_j) on the causal pairs, 0 elsewhere; [G, C, C, K] from [G, C, K]."""
    diff = bi[:, :, None, :] - bj[:, None, :, :]
    return torch.where(mask[:, :, None], diff, 0.0).exp() * mask[:, :, None]


class _KeyDecayedScores(torch.autograd.Function):
    """A_ij = sum_k q_ik k_jk exp(b_ik - b_jk) for j <= i (else 0), on [G, C, K] blocks."""

    @staticmethod
    def forward(ctx, q, k, b):
        G, C, K = q.shape
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        step = max(1, _GROUP_ELEMS // (C * C * K))
        out = q.new_empty(G, C, C)
        for s in range(0, G, step):
            e = slice(s, s + step)
            out[e] = torch.einsum("gik,gijk,gjk->gij", q[e], _decay_pairs(b[e], b[e], mask), k[e])
        ctx.save_for_backward(q, k, b)
        return out

    @staticmethod
    def backward(ctx, dA):
        q, k, b = ctx.saved_tensors
        G, C, K = q.shape
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        step = max(1, _GROUP_ELEMS // (C * C * K))
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dA = dA * mask
        for s in range(0, G, step):
            e = slice(s, s + step)
            w = _decay_pairs(b[e], b[e], mask) * dA[e][..., None]
            dq[e] = torch.einsum("gijk,gjk->gik", w, k[e])
            dk[e] = torch.einsum("gijk,gik->gjk", w, q[e])
        # b_i enters with +, b_j with -: db = q dq - k dk
        return dq, dk, q * dq - k * dk


def _key_scores(q: Tensor, k: Tensor, b: Tensor, subs: tuple) -> Tensor:
    """Causal per-key-dim decayed scores [..., C, C] from [..., C, K], split in sub-blocks of subs[0]
    rows (as the Triton kernel): block (I, J < I) is one matmul with the decay split at I's first
    row r, (q_I e^(b_I - b_r)) (k_J e^(b_r - b_J))^T, both exponents <= 0; diagonal blocks recurse
    with subs[1:], and are exact (the custom op) at the last level."""
    *lead, C, K = q.shape
    sub = subs[0] if subs and C % subs[0] == 0 else C
    n = C // sub
    fold = lambda x: x.reshape(-1, sub, K)
    if n == 1:
        return _KeyDecayedScores.apply(fold(q), fold(k), fold(b)).view(*lead, C, C)
    diag = _key_scores(fold(q), fold(k), fold(b), subs[1:]).view(*lead, n, sub, sub).unbind(-3)
    qs, ks, bs = q.split(sub, -2), k.split(sub, -2), b.split(sub, -2)
    rows = []
    for i in range(n):
        parts = []
        if i:
            ref = bs[i][..., :1, :]
            qi = qs[i] * (bs[i] - ref).exp()
            kj = torch.cat(ks[:i], -2) * (ref - torch.cat(bs[:i], -2)).exp()
            parts.append(qi @ kj.transpose(-1, -2))
        parts.append(diag[i])
        if i < n - 1:
            parts.append(q.new_zeros(*lead, sub, (n - 1 - i) * sub))
        rows.append(torch.cat(parts, -1))
    return torch.cat(rows, -2)


def _chunk_terms(qc, kc, vc, gc, gate: str):
    """Per-chunk pieces, batched over chunks: [R, n, H, C, *] in.
    Returns scores (causal, decayed), qe = q e^b, updates = (k e^(b_L - b))^T v, decay = e^(b_L)."""
    C = qc.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    if gate == "none":
        return (qc @ kc.transpose(-1, -2)) * mask, qc, kc.transpose(-1, -2) @ vc, None
    b = gc.cumsum(3)                                                    # inclusive, in-chunk
    if gate == "head":                                                  # b: [R, n, H, C]
        rel = torch.where(mask, b[..., :, None] - b[..., None, :], 0.0).exp() * mask
        scores = (qc @ kc.transpose(-1, -2)) * rel
        qe = qc * b.exp()[..., None]
        ke = kc * (b[..., -1:] - b).exp()[..., None]
        decay = b[..., -1].exp()[..., None, None]                       # [R, n, H, 1, 1]
    else:                                                               # b: [R, n, H, C, K]
        scores = _key_scores(qc, kc, b, KEY_SUBS)
        qe = qc * b.exp()
        ke = kc * (b[..., -1:, :] - b).exp()
        decay = b[..., -1, :].exp()[..., None]                          # [R, n, H, K, 1]
    return scores, qe, ke.transpose(-1, -2) @ vc, decay


def _auto_chunk(default: int, T: int, cu_seqlens: Optional[Tensor]) -> int:
    """The default chunk, or the smallest power of two >= the longest sequence (at least MIN_CHUNK)
    when that is shorter: short sequences are not padded to a full chunk (seq_len 16 would pay for
    64 tokens per row otherwise)."""
    longest = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return min(default, max(MIN_CHUNK, 1 << max(0, longest - 1).bit_length()))


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
              initial_state: Optional[Tensor], output_final_state: bool,
              cu_seqlens: Optional[Tensor], chunk_size: Optional[int] = None):
    dt = torch.promote_types(q.dtype, torch.float32)
    B, T, H, K = q.shape
    V = v.shape[-1]
    gate = "none" if g is None else ("head" if g.dim() == 3 else "key")
    C = chunk_size or _auto_chunk(KEY_CHUNK if gate == "key" else 64, T, cu_seqlens)
    lay = build_layout(B, T, C, cu_seqlens, q.device)
    R, NC = lay.rows, lay.nchunks

    s0 = None if initial_state is None else initial_state.to(dt)
    zero = q.new_zeros(R, H, K, V, dtype=dt)
    state = zero if (s0 is None or lay.varlen) else s0
    docs = lay.chunk_doc.tolist() if lay.varlen else None
    want_ends = lay.varlen and output_final_state
    # The sequence is processed in blocks of a fixed number of chunks, so every op works on a
    # cache-sized tensor whatever T is (time linear in T). split, not slicing: a slice's backward
    # writes a full-size zero gradient (quadratic in T); blocks are split off the sequence-first
    # layout and transposed one by one, so no full-length layout copies (none when C divides T).
    # (Recomputing each block in the backward was tried: less memory, ~40% slower on CPU.)
    # Mamba-2 with one group passes q and k expanded over the heads (stride 0): the scores are then
    # computed once per chunk for all heads (see _block_shared), and only one head is chunked.
    shared = gate == "head" and H > 1 and q.stride(2) == 0 and k.stride(2) == 0
    if shared:
        q, k = q[:, :, :1], k[:, :, :1]
    per = max(1, BLOCK_TOKENS // C)
    chunked = lambda x: to_chunks(x.to(dt), lay).split(per, dim=1)                  # [R, n, C, H, *]
    blocks = zip(*(chunked(x) for x in (q, k, v)), *([chunked(g)] if g is not None else [(None,) * NC]))
    outs, ends, c0 = [], [], 0
    for qb, kb, vb, gb in blocks:
        n = qb.shape[1]
        if n == 0:                                         # T = 0 splits into one empty block
            continue
        # documents starting in this block take their initial state (host-known positions)
        starts = [c0 + i for i in range(n) if lay.varlen and lay.first[c0 + i]]
        s0b = s0.index_select(0, torch.tensor([docs[c] for c in starts], device=q.device)) \
            if (starts and s0 is not None) else None
        run = _block_shared if shared else partial(_block, gate=gate)
        ob, state, eb = run(qb, kb, vb, gb, state, s0b, scale=scale, resets=[c - c0 for c in starts],
                            want_ends=want_ends)
        outs.append(ob)
        ends.append(eb)
        c0 += n
    o = torch.cat(outs, 1) if outs else q.new_zeros(R, 0, C, H, V, dtype=dt)
    o = from_chunks(o, lay).to(v.dtype)

    if not output_final_state:
        return o, None
    if not lay.varlen:
        return o, state
    # each document's final state leaves its last chunk; an empty document keeps its initial state
    ends = torch.cat(ends, 0) if ends else zero[:0]
    last = lay.last_chunk
    final = ends.index_select(0, last.clamp(min=0)) if NC else zero.expand(last.numel(), H, K, V)
    keep = s0 if s0 is not None else zero
    return o, torch.where((last < 0)[:, None, None, None], keep, final)


def _scan(upd: Tensor, dec: Optional[Tensor], state: Tensor, s0b: Optional[Tensor], resets: list):
    """The sequential pass over one block's n chunks: S_(i+1) = dec_i * S_i + upd_i, where a document
    starts (chunks in `resets`) S_i is its initial state (the rows of s0b, in order) or 0.
    upd [R, n, *S], dec broadcastable to it or None. Returns (the state entering each chunk [R, n, *S],
    the state leaving the block, the list of chunk-end states)."""
    upd = upd.unbind(1)
    dec = dec.unbind(1) if dec is not None else None
    inits = iter(s0b.unbind(0)) if s0b is not None else None
    states, ends = [], []
    for i in range(len(upd)):
        if i in resets:                                    # a document starts on this chunk edge
            state = next(inits)[None] if inits is not None else torch.zeros_like(state)
        states.append(state)
        state = (state * dec[i] if dec is not None else state) + upd[i]
        ends.append(state)
    return torch.stack(states, 1), state, ends


def _block(qb, kb, vb, gb, state, s0b, *, gate, scale, resets, want_ends):
    """One block of chunks, sequence-first [R, n, C, H, *] in and out. `state` enters the first chunk;
    at the chunks listed in `resets` a document starts with its initial state (s0b, in order) or 0.
    Returns (o [R, n, C, H, V], state leaving the block, [n, H, K, V] chunk-end states or None)."""
    qc, kc, vc = (x.transpose(2, 3) for x in (qb, kb, vb))                         # [R, n, H, C, *]
    gc = gb.transpose(2, 3) if gb is not None else None
    scores, qe, updates, decay = _chunk_terms(qc, kc, vc, gc, gate)
    states, state, ends = _scan(updates, decay, state, s0b, resets)
    o = ((scores @ vc + qe @ states) * scale).transpose(2, 3)
    return o, state, (torch.cat(ends, 0) if want_ends else None)


def _block_shared(qb, kb, vb, gb, state, s0b, *, scale, resets, want_ends):
    """_block for per-head gates with q and k shared by every head (qb, kb [R, n, C, 1, K]; Mamba-2's
    SSD with one group). The scores q k^T are one matmul per chunk for all heads, and the per-head
    decays are moved off q and k: onto v for the state update, k^T (v e^(b_L - b)), and onto the
    output rows for the inter-chunk term, e^b (q S). Everything stays sequence-first (no per-head
    copies of q and k); the state is kept as [R, K, H, V] inside (one matmul for all heads)."""
    q1, k1 = qb[:, :, :, 0], kb[:, :, :, 0]                                        # [R, n, C, K]
    R, n, C, H, V = vb.shape
    b = gb.cumsum(2)                                                               # [R, n, C, H]
    bt = b.transpose(2, 3)
    mask = torch.ones(C, C, dtype=torch.bool, device=vb.device).tril()
    rel = torch.where(mask, bt[..., :, None] - bt[..., None, :], float("-inf")).exp()  # [R, n, H, C, C]
    scores = (q1 @ k1.transpose(-1, -2)).unsqueeze(2) * rel
    intra = scores @ vb.transpose(2, 3)                                            # [R, n, H, C, V]
    vs = vb * (b[:, :, -1:] - b).exp().unsqueeze(-1)                               # [R, n, C, H, V]
    upd = (k1.transpose(-1, -2) @ vs.flatten(3)).unflatten(3, (H, V))              # [R, n, K, H, V]
    dec = b[:, :, -1].exp()[:, :, None, :, None]                                   # [R, n, 1, H, 1]
    states, state, ends = _scan(upd, dec, state.transpose(1, 2), None if s0b is None else s0b.transpose(1, 2),
                                resets)
    inter = (q1 @ states.flatten(3)).unflatten(3, (H, V)) * b.exp().unsqueeze(-1)  # [R, n, C, H, V]
    o = (intra.transpose(2, 3) + inter) * scale
    return o, state.transpose(1, 2), (torch.cat(ends, 0).transpose(1, 2) if want_ends else None)
