"""Hydra (Chaudhary & Browning 2025, arXiv:2508.15099): a Mamba-2 backbone with intermittent sparse
global attention, chunk-level MoE feed-forwards and two memories (a causal workspace and a product-key
memory), as the `hydra` arch preset; plus the document layout helpers its modules share.

Letters (see the modules): mixers `X` sparse global attention (sparse_attention.py), `R` workspace
memory (memory.py); FFNs `E` mixture of experts (moe.py), `P` product-key memory (memory.py).
The preset is the paper-scale shape (`recipes/hydra-1.6b.yaml`: 1.62B parameters, 0.85B active per
token with a 50277-token vocabulary): 24 layers of d_model 2048, `MMXMMXMMXMMR` (sparse global
attention in every third block as in the paper, window 256, 8 blocks of 64; a workspace memory
layer every 12th), chunk-routed top-2-of-8 MoE FFNs (SwiGLU hidden 768) in every layer except a
192^2-value PKM in layers 5 and 17.

Frames: a module that looks back along the sequence works on a *frame*: the tokens its local queries
may see. Training: global positions [0, q_off + T) (gathered through `ctx.ops` under sequence
parallelism, the local tensors otherwise), whose first token starts a document. Decoding: the cached
history followed by the new tokens, one document per row (recurrent.check_cache_docs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

HYDRA_PRESET = {
    "d_model": 2048,
    "n_layers": 24,
    "pattern": "MMXMMXMMXMMR",
    "ffn_pattern": "EEEEEPEEEEEE",
    "mixers": {
        "sparse_attention": {"n_heads": 16, "window": 256, "block_size": 64, "top_k": 8},
        "workspace": {"n_slots": 64, "slot_dim": 1024, "n_heads": 8, "chunk_size": 64},
    },
    "ffns": {
        "moe": {"n_experts": 8, "top_k": 2, "hidden": 768, "routing": "chunk", "chunk_size": 64},
        "pkm": {"n_heads": 4, "n_sub_keys": 192, "key_dim": 256, "top_k": 8},
    },
}


def sequence_frame(ctx, T: int, *tensors: Tensor) -> tuple[list[Tensor], Optional[Tensor], int]:
    """The training-path frame of local tensors [B, T, ...]: (frame tensors [B, F, ...], their document
    starts [B, F] bool or None, q_off = frame index of the first local token; F = q_off + T).

    Under sequence parallelism the frame is gathered with `ctx.ops.gather_sequence` (autograd-aware;
    the part after this rank is never visible, so it is cut off); locally it is the tensors as given.
    """
    q_off = ctx.ops.position_offset(T)
    end = q_off + T
    if ctx.ops.sp_size > 1:
        tensors = tuple(ctx.ops.gather_sequence(t, dim=1)[:, :end] for t in tensors)
    ds = ctx.doc_start
    if ds is not None:
        ds = ds.to(torch.bool)
        if ctx.ops.sp_size > 1:
            with torch.no_grad():   # float: collectives need not support bool
                ds = ctx.ops.gather_sequence(ds.to(torch.float32), dim=1)[:, :end] > 0.5
    return list(tensors), ds, q_off


def doc_layout(doc_start: Optional[Tensor], B: int, F: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """starts [B, F] bool (frame index 0 always starts a document), rel [B, F] (index of each token
    within its document) and seg [B, F] (document number within the row)."""
    idx = torch.arange(F, device=device)
    starts = torch.zeros(B, F, dtype=torch.bool, device=device)
    if doc_start is not None:
        starts |= doc_start.to(device=device, dtype=torch.bool)
    starts[:, 0] = True
    last = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return starts, idx - last, starts.long().cumsum(1) - 1


def runs(starts: Tensor, rel: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut every document into consecutive runs of `size` tokens counted from its first token (its
    last run may be shorter). Returns run id per token [B, F] (numbered within the row), and per run
    [B, N]: its first frame index (F for rows with fewer runs) and its length (0 for those)."""
    B, F = starts.shape
    flags = starts | (rel % size == 0)
    rid = flags.long().cumsum(1) - 1
    N = int(rid[:, -1].max()) + 1
    idx = torch.arange(F, device=starts.device).expand(B, F)
    first = torch.full((B, N), F, dtype=torch.long, device=starts.device).scatter_reduce(1, rid, idx, "amin")
    length = torch.zeros(B, N, dtype=torch.long, device=starts.device).scatter_add(1, rid, torch.ones_like(rid))
    return rid, first, length
