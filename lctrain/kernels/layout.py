"""Chunk tables for the chunked GLA paths (torch `chunk` and `triton`).

Without `cu_seqlens` every batch row is cut into `ceil(T / C)` chunks (the last one zero-padded).
With `cu_seqlens` (B = 1) each document is chunked on its own, so a chunk never spans two documents:
every document starts on a chunk edge, its initial state is the state entering its first chunk and
its final state is the state leaving its last one. The price is at most C - 1 padding tokens per
document; empty documents own no chunk. The tables are built on the host (as fla does) with
vectorised tensor ops: no Python loop over documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class ChunkLayout:
    chunk: int                       # C
    rows: int                        # R: B without cu_seqlens, 1 with
    nchunks: int                     # chunks per row
    seqlen: int                      # T
    # varlen only (None otherwise); all on the tensors' device unless noted
    gather: Optional[Tensor] = None  # [NC*C] token index of each chunk slot, T for padding
    scatter: Optional[Tensor] = None  # [T] chunk slot of each token
    chunk_doc: Optional[Tensor] = None  # [NC] document of each chunk
    chunk_start: Optional[Tensor] = None  # [NC] first token of each chunk
    chunk_len: Optional[Tensor] = None  # [NC] valid tokens in each chunk (1..C)
    first: Optional[list] = None     # host bools: chunk is its document's first
    last_chunk: Optional[Tensor] = None  # [N] last chunk of each document, -1 if empty
    doc_chunk0: Optional[Tensor] = None  # [N] first chunk of each document
    doc_nchunks: Optional[Tensor] = None  # [N] chunks of each document (0 if empty)

    @property
    def varlen(self) -> bool:
        return self.gather is not None


def build_layout(batch: int, seqlen: int, chunk: int, cu_seqlens: Optional[Tensor],
                 device: torch.device) -> ChunkLayout:
    if cu_seqlens is None:
        return ChunkLayout(chunk, batch, -(-seqlen // chunk), seqlen)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    n_doc = lens.numel()
    per_doc = (lens + chunk - 1) // chunk                      # chunks of each document
    chunk_doc = torch.repeat_interleave(torch.arange(n_doc), per_doc)
    nc = chunk_doc.numel()
    first_idx = torch.cumsum(per_doc, 0) - per_doc             # index of each document's first chunk
    within = torch.arange(nc) - first_idx[chunk_doc]           # chunk number inside its document
    start = cu[:-1][chunk_doc] + within * chunk
    clen = torch.minimum(cu[1:][chunk_doc] - start, torch.tensor(chunk))
    slot = torch.arange(chunk)
    valid = slot[None, :] < clen[:, None]
    gather = torch.where(valid, start[:, None] + slot[None, :], torch.tensor(seqlen)).reshape(-1)
    scatter = torch.empty(seqlen, dtype=torch.int64)
    scatter[gather[valid.reshape(-1)]] = torch.nonzero(valid.reshape(-1)).flatten()
    last_chunk = torch.where(per_doc > 0, first_idx + per_doc - 1, torch.tensor(-1))
    first = (within == 0).tolist()
    to = lambda t: t.to(device)
    return ChunkLayout(chunk, 1, nc, seqlen, to(gather), to(scatter), to(chunk_doc), to(start),
                       to(clen), first, to(last_chunk), to(first_idx), to(per_doc))


def to_chunks(x: Tensor, lay: ChunkLayout) -> Tensor:
    """[B, T, H, *] -> [R, NC, C, H, *] (zero padding)."""
    C, NC = lay.chunk, lay.nchunks
    if not lay.varlen:
        pad = NC * C - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x.reshape(x.shape[0], NC, C, *x.shape[2:])
    row = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], dim=0)   # slot T is the zero row
    return row.index_select(0, lay.gather).reshape(1, NC, C, *x.shape[2:])


def from_chunks(y: Tensor, lay: ChunkLayout) -> Tensor:
    """[R, NC, C, H, *] -> [B, T, H, *]."""
    flat = y.reshape(y.shape[0], -1, *y.shape[3:])
    if not lay.varlen:
        return flat[:, :lay.seqlen]
    return flat[0].index_select(0, lay.scatter).unsqueeze(0)
