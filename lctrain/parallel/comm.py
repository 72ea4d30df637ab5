"""Autograd-aware collectives over one process group, each counting the bytes this rank sends.

Forward and backward traffic are both counted (backward when the gradient reaches the collective),
under the layer type the caller names (`lasp2`, `ulysses`, `lasp2h`, `halo_conv`, ...). "Bytes sent"
is the logical payload leaving this rank, independent of the algorithm the backend picks:
- all-gather of an n-byte piece: (P-1)·n forward; its backward (a reduce-scatter): (P-1)·n;
- all-to-all of an n-byte input: the n·(P-1)/P that goes to other ranks, same in backward;
- halo exchange: the tokens this rank ships to later ranks (and their gradients back).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
from torch import Tensor

# torch.distributed.nn.functional works (and is the documented autograd-aware API) but warns on
# every call that it is deprecated in favour of the private _functional_collectives.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional.*deprecated",
                        category=FutureWarning)


class CommMeter:
    """Bytes sent per layer type since the last `pop()`."""

    def __init__(self):
        self._bytes: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int):
        self._bytes[kind] += int(nbytes)

    def pop(self) -> dict[str, int]:
        out = dict(self._bytes)
        self._bytes.clear()
        return out


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _count_backward(t: Tensor, meter: CommMeter, kind: str, nbytes: int) -> Tensor:
    # The hook fires when the gradient of `t` is complete, i.e. right before the collective's
    # backward runs, so every rank counts its backward traffic exactly once per backward pass.
    if t.requires_grad:
        t.register_hook(lambda g: (meter.add(kind, nbytes), None)[1])
    return t


def anchor(out: Tensor, *deps: Tensor) -> Tensor:
    """`out`, made to depend (with zero gradient) on `deps`.

    A collective's backward is itself a collective: every rank of the group must run it. A rank whose
    result does not use a collective's output (LASP-2 rank 0 uses none of the gathered states) would
    skip that backward node and hang the others, so the output is tied into the graph.
    The deps must be finite (0 · inf = nan)."""
    extra = [d.sum() for d in deps if d.requires_grad]
    if not extra or not torch.is_grad_enabled():
        return out
    return out + torch.stack(extra).sum().to(out.dtype) * 0


class _AllGather(torch.autograd.Function):
    """All-gather along `dim`; backward: each rank gets the sum over ranks of the gradient of its
    piece (a reduce-scatter). torch.distributed.nn.functional.all_gather is not used: on gloo its
    backward scatters with group ranks where global ranks are expected, so it fails on any group
    that is not the whole world (every SP group under DP x SP)."""

    @staticmethod
    def forward(ctx, x, group, dim, meter, kind, nbytes):
        ctx.group, ctx.dim, ctx.meter, ctx.kind, ctx.nbytes = group, dim, meter, kind, nbytes
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        P = dist.get_world_size(ctx.group)
        ctx.meter.add(ctx.kind, ctx.nbytes)
        pieces = torch.stack(grad.chunk(P, dim=ctx.dim)).contiguous()      # [P, *x.shape]
        if dist.get_backend(ctx.group) == "nccl":
            out = pieces.new_empty(pieces.shape[1:])
            dist.reduce_scatter_tensor(out, pieces, group=ctx.group)
        else:
            recv = torch.empty_like(pieces)
            dist.all_to_all_single(recv, pieces, group=ctx.group)
            out = recv.sum(0)
        return out, None, None, None, None, None


def all_gather(x: Tensor, group, meter: CommMeter, kind: str, dim: int = 0) -> Tensor:
    """Concatenation along `dim` of every rank's `x` (same shape on every rank), differentiable:
    the backward sums the gradients of all ranks for each piece (a reduce-scatter)."""
    P = dist.get_world_size(group)
    nbytes = (P - 1) * _nbytes(x)
    meter.add(kind, nbytes)
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(x, group, dim, meter, kind, nbytes)
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_to_all(x: Tensor, group, meter: CommMeter, kind: str, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split `x` in P equal pieces along `scatter_dim`, send piece p to rank p, and concatenate the
    pieces received from all ranks along `gather_dim` (Ulysses' sequence <-> head re-sharding)."""
    P = dist.get_world_size(group)
    nbytes = _nbytes(x) * (P - 1) // P
    meter.add(kind, nbytes)
    # Move the split dim first so each destination's piece is one contiguous block.
    xs = x.movedim(scatter_dim, 0)
    n = xs.shape[0]
    xs = xs.reshape(P, n // P, *xs.shape[1:]).contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        out = dnn.all_to_all_single(torch.empty_like(xs), xs, group=group)
        out = _count_backward(out, meter, kind, nbytes)
    else:
        out = torch.empty_like(xs)
        dist.all_to_all_single(out, xs, group=group)
    # out[p] is the piece from rank p: [P, n/P, ...] with the scatter dim first.
    out = out.movedim(1, scatter_dim + 1)                    # [P, ..., n/P at scatter_dim, ...]
    out = out.movedim(0, gather_dim)                        # the source-rank axis just before gather_dim
    shape = list(out.shape)
    shape[gather_dim:gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
    return out.reshape(shape)


def halo(x: Tensor, h: int, group, meter: Optional[CommMeter], kind: str, dim: int = 1) -> Tensor:
    """The `h` tokens (along `dim`) just before this rank's part, from as many previous ranks as they
    span; shorter (down to empty) near the start of the sequence. Every rank holds L = x.shape[dim]
    tokens. Differentiable: gradients of the halo go back to the ranks that sent it."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    L = x.shape[dim]
    if h <= 0:
        return x.narrow(dim, 0, 0)
    # Rank j's global token range is [jL, (j+1)L); rank s needs [max(0, sL-h), sL).
    def piece(src: int, dst: int) -> tuple[int, int]:
        lo, hi = max(src * L, dst * L - h), min((src + 1) * L, dst * L)
        return (lo - src * L, max(0, hi - lo)) if dst > src else (0, 0)
    send = [piece(r, s) for s in range(P)]
    recv_sizes = [piece(j, r)[1] for j in range(P)]
    xs = x.movedim(dim, 0)
    inp = torch.cat([xs[a:a + n] for a, n in send], 0).contiguous()
    nbytes = _nbytes(inp)
    if meter is not None:
        meter.add(kind, nbytes)
    out_shape = (sum(recv_sizes), *xs.shape[1:])
    send_sizes = [n for _, n in send]
    if x.requires_grad and torch.is_grad_enabled():
        out = dnn.all_to_all_single(x.new_empty(out_shape), inp, output_split_sizes=recv_sizes,
                                    input_split_sizes=send_sizes, group=group)
        if meter is not None:
            out = _count_backward(out, meter, kind, nbytes)
    else:
        out = x.new_empty(out_shape)
        dist.all_to_all_single(out, inp, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                               group=group)
    return out.movedim(0, dim)


def all_reduce_coalesced(tensors: Sequence[Tensor], group, bucket_bytes: int = 64 << 20) -> int:
    """In-place SUM of `tensors` over `group`, flattened into buckets of one dtype/device.
    Returns the bytes this rank sent (ring all-reduce: 2·(P-1)/P of the payload)."""
    P = dist.get_world_size(group)
    sent = 0
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_kind[(t.dtype, t.device)].append(t)
    for ts in by_kind.values():
        bucket, size = [], 0
        for t in ts + [None]:
            if t is not None:
                bucket.append(t)
                size += _nbytes(t)
            if bucket and (t is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                sent += 2 * (P - 1) * _nbytes(flat) // P
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
                bucket, size = [], 0
    return sent
