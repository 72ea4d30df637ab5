"""How sequence-mixing primitives run: locally (here) or sequence-parallel (lctrain.parallel).

Mixers never call torch.distributed. Every op that mixes information along the sequence goes through
a `SequenceOps` object carried in the `SeqContext`; `lctrain.parallel` provides a subclass that runs
the same ops on a contiguous shard of the sequence per rank (LASP-2, Ulysses, halo exchange) with
results identical to `LocalOps` on the full sequence.

Document boundaries arrive as `doc_start: [B, T] bool` (True on the first token of a document). The
local ops flatten `[B, T]` into one packed row with `cu_seqlens`, so batch rows and documents are
both independent sequences for the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lctrain import kernels


def doc_cu_seqlens(doc_start: Optional[Tensor], batch: int, seqlen: int, device) -> Tensor:
    """cu_seqlens (int32, [N+1]) of the flattened [B*T] row: a boundary at every row start and doc start."""
    starts = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    if doc_start is not None:
        starts |= doc_start.to(device=device, dtype=torch.bool)
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    end = torch.tensor([batch * seqlen], device=device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def doc_offsets(doc_start: Tensor) -> Tensor:
    """Index of every token inside its document, [B, T] int64 (each row's first token starts one)."""
    B, T = doc_start.shape
    idx = torch.arange(T, device=doc_start.device).expand(B, T)
    starts = doc_start.to(torch.bool).clone()
    starts[:, 0] = True
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


def _row_first_last_docs(cu: Tensor, batch: int, seqlen: int):
    """Indices (into the N documents) of the first and last document of each batch row."""
    starts = cu[:-1].long()
    row_starts = torch.arange(batch, device=cu.device) * seqlen
    first = torch.searchsorted(starts, row_starts)
    last = torch.searchsorted(starts, row_starts + seqlen) - 1
    return first, last


def _starts_inside(doc_start: Optional[Tensor]) -> bool:
    """Does a document start anywhere but at a row's first token? (Otherwise rows are the sequences.)"""
    return doc_start is not None and bool(doc_start[:, 1:].any())


def _flat(t: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    """[B, T, ...] -> one packed row [1, B*T, ...]."""
    return None if t is None else t.reshape(1, B * T, *t.shape[2:])


class LocalOps:
    """Single-process sequence ops: the reference every parallel layout must reproduce."""

    sp_size = 1
    sp_rank = 0

    def position_offset(self, local_len: int) -> int:
        """Global index of this shard's first token (0 without sequence parallelism)."""
        return 0

    def global_seq_len(self, local_len: int) -> int:
        return local_len * self.sp_size

    def gather_sequence(self, x: Tensor, dim: int = 1) -> Tensor:
        """The full sequence of a sequence-sharded tensor (autograd-aware under SP)."""
        return x

    # --- the gated linear-attention primitive -------------------------------------------------
    def linear_attention(self, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, *,
                         scale: Optional[float] = None, doc_start: Optional[Tensor] = None,
                         initial_state: Optional[Tensor] = None, output_final_state: bool = False):
        """`S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`, state reset at document starts.

        initial_state / final_state are per batch row: `[B, H, K, V]` (the row's first / last document).
        """
        B, T = q.shape[:2]
        if not _starts_inside(doc_start):
            return kernels.gated_linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                                  output_final_state=output_final_state)
        cu = doc_cu_seqlens(doc_start, B, T, q.device)
        first, last = _row_first_last_docs(cu, B, T)
        init = None
        if initial_state is not None:
            init = initial_state.new_zeros(cu.numel() - 1, *initial_state.shape[1:])
            init = init.index_copy(0, first, initial_state)
        o, final = kernels.gated_linear_attention(_flat(q, B, T), _flat(k, B, T), _flat(v, B, T), _flat(g, B, T),
                                                  scale=scale,
                                                  initial_state=init, cu_seqlens=cu,
                                                  output_final_state=output_final_state)
        o = o.reshape(B, T, *o.shape[2:])
        return o, (final[last] if final is not None else None)

    # --- softmax attention ----------------------------------------------------------------------
    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, doc_start: Optional[Tensor] = None,
                  window: Optional[int] = None) -> Tensor:
        """Causal softmax attention over [B, T, H, D] (GQA aware), masked at document starts."""
        B, T = q.shape[:2]
        if not _starts_inside(doc_start):
            return kernels.attention(q, k, v, causal=True, window=window)
        if B > 1 and not kernels.attention_uses_flash(q):   # per-row masks: B T^2 work, not (B T)^2
            ids = doc_start.to(torch.bool).long().cumsum(1)
            return kernels.attention(q, k, v, causal=True, window=window, doc_ids=ids)
        cu = doc_cu_seqlens(doc_start, B, T, q.device)
        o = kernels.attention(_flat(q, B, T), _flat(k, B, T), _flat(v, B, T), causal=True, window=window,
                              cu_seqlens=cu)
        return o.reshape(B, T, *o.shape[2:])

    # --- depthwise causal convolution -----------------------------------------------------------
    def causal_conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    doc_start: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
        """Depthwise causal conv over [B, T, D] with zero history at every document start."""
        offsets = doc_offsets(doc_start) if _starts_inside(doc_start) else None
        return kernels.short_conv(x, weight, bias, offsets=offsets, activation=activation)


LOCAL_OPS = LocalOps()


class EagerOps:
    """The sequence ops of `ops`, run eagerly from inside `torch.compile`d blocks (each call is a graph
    break): the chunk scan's Python loop over chunks would be unrolled into the graph, and collectives
    (sequence parallelism) stay outside it. Everything between two ops is compiled and fused."""

    def __init__(self, ops: LocalOps):
        self.ops = ops
        self.sp_size, self.sp_rank = ops.sp_size, ops.sp_rank

    @torch.compiler.disable
    def position_offset(self, local_len: int) -> int:
        return self.ops.position_offset(local_len)

    @torch.compiler.disable
    def global_seq_len(self, local_len: int) -> int:
        return self.ops.global_seq_len(local_len)

    @torch.compiler.disable
    def gather_sequence(self, x: Tensor, dim: int = 1) -> Tensor:
        return self.ops.gather_sequence(x, dim)

    @torch.compiler.disable
    def linear_attention(self, *args, **kwargs):
        return self.ops.linear_attention(*args, **kwargs)

    @torch.compiler.disable
    def attention(self, *args, **kwargs):
        return self.ops.attention(*args, **kwargs)

    @torch.compiler.disable
    def causal_conv(self, *args, **kwargs):
        return self.ops.causal_conv(*args, **kwargs)
