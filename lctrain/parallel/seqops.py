"""Sequence-parallel sequence ops: the `LocalOps` calls on a contiguous shard per rank, same results.

Rank r of P holds tokens [rL, (r+1)L) of every row (DESIGN.md §3-4):
- `linear_attention`: LASP-2 — local pass from a zero state, one all-gather of (local final state,
  local total decay), a prefix scan over lower ranks, an output correction. Exact for g = None /
  per head / per key dim and across document boundaries. No hand-written backward: autograd runs
  the kernel's own backward (with a gradient on its final state), the scan and correction, and the
  all-gather's adjoint, one reduce-scatter (comm.py).
- `attention`: Ulysses (all-to-all sequence <-> heads) or LASP-2H (all-gather K, V; local queries
  at their global causal offset), per `parallel.sp_attention`; sliding windows always use a halo of
  the W-1 previous tokens, from as many previous ranks as the window spans.
- `causal_conv`: a halo of the k-1 previous inputs.
- `gather_sequence`: autograd all-gather along the sequence.

SPMD contract: every rank of the SP group makes the same op calls in the same order with the same
shapes, and the same None-ness of optional arguments (doc_start, g, initial_state). Which
collectives run never depends on tensor values, so ranks cannot diverge into a hang.

Replicated inputs and outputs (initial_state, final_state, weights) follow the parameter
convention: each rank's gradient is its partial, summed over the SP group by the DP x SP gradient
reduction, so a loss term on the (replicated) final state must be counted once over the group.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lctrain import kernels
from lctrain.models.seqops import LocalOps, doc_cu_seqlens
from lctrain.parallel.comm import CommMeter, all_gather, all_to_all, anchor, halo


class SequenceParallelOps(LocalOps):
    def __init__(self, group, sp_attention: str = "ulysses", meter: Optional[CommMeter] = None):
        if sp_attention not in ("ulysses", "lasp2h"):
            raise ValueError(f"parallel.sp_attention must be 'ulysses' or 'lasp2h', got {sp_attention!r}")
        self.group = group
        self.sp_size = dist.get_world_size(group)
        self.sp_rank = dist.get_rank(group)
        self.sp_attention = sp_attention
        self.meter = meter if meter is not None else CommMeter()
        # doc_start is one tensor per step shared by every layer: its gathered / halo forms are
        # computed once (keyed on the tensor object and its version; we hold the reference so the
        # identity cannot be recycled).
        self._doc_cache: dict = {}

    # --- positions ------------------------------------------------------------------------------
    def position_offset(self, local_len: int) -> int:
        return self.sp_rank * local_len

    def global_seq_len(self, local_len: int) -> int:
        return local_len * self.sp_size

    def gather_sequence(self, x: Tensor, dim: int = 1) -> Tensor:
        return all_gather(x, self.group, self.meter, "gather", dim=dim % x.dim())

    # --- document starts --------------------------------------------------------------------------
    def _doc(self, doc_start: Optional[Tensor], key, make):
        if doc_start is None:
            return None
        hit = self._doc_cache.get(key)
        if hit is not None and hit[0] is doc_start and hit[1] == doc_start._version:
            return hit[2]
        with torch.no_grad():
            out = make(doc_start.to(torch.uint8)).to(torch.bool)   # gloo has no bool collectives
        self._doc_cache[key] = (doc_start, doc_start._version, out)
        return out

    def _doc_full(self, doc_start):
        return self._doc(doc_start, "full", lambda d: all_gather(d, self.group, self.meter, "doc_start", dim=1))

    def _doc_halo(self, doc_start, h: int):
        return self._doc(doc_start, ("halo", h), lambda d: halo(d, h, self.group, self.meter, "doc_start", dim=1))

    # --- LASP-2 -----------------------------------------------------------------------------------
    def linear_attention(self, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, *,
                         scale: Optional[float] = None, doc_start: Optional[Tensor] = None,
                         initial_state: Optional[Tensor] = None, output_final_state: bool = False):
        B, L, H, K = q.shape
        V = v.shape[-1]
        P, r = self.sp_size, self.sp_rank
        scale = K ** -0.5 if scale is None else float(scale)

        # 1. Local pass from a zero state: o_loc and the part's final state M_r (of its last document).
        o_loc, M = LocalOps.linear_attention(self, q, k, v, g, scale=scale, doc_start=doc_start,
                                             initial_state=None, output_final_state=True)

        # 2. decay[t]: factor of the incoming state in S_t, exp(inclusive cumsum of g), cut to 0 from
        # the first document start in the part on (a multiplicative reset, not g = -inf: DESIGN §2).
        # On rank 0 a doc start on global token 0 keeps the initial state, as LocalOps does.
        if g is None:
            decay = q.new_ones((B, L, 1, 1), dtype=torch.float32)
        else:
            decay = torch.exp(g.float().cumsum(1))
            decay = decay.unsqueeze(-1) if g.dim() == 3 else decay     # [B, L, H, 1 or K]
        if doc_start is not None:
            starts = doc_start.to(torch.bool)
            if r == 0:
                starts = torch.cat([torch.zeros_like(starts[:, :1]), starts[:, 1:]], 1)
            keep = (starts.cumsum(1) == 0).to(torch.float32)
            decay = decay * keep[:, :, None, None]
        A = decay[:, -1]                                                # [B, 1 or H, 1 or K]

        # 3. One all-gather of (M_r, A_r): size independent of T.
        payload = torch.cat([M.float().reshape(B, -1), A.reshape(B, -1)], 1)
        gathered = all_gather(payload.unsqueeze(0), self.group, self.meter, "lasp2", dim=0)   # [P, B, n]
        nM = H * K * V

        # 4. Prefix scan: S_in(0) = initial state, S_in(j+1) = A_j * S_in(j) + M_j (None = zero state).
        S = initial_state.float() if initial_state is not None else None
        S_in = S if r == 0 else None
        for j in range(P if output_final_state else r):
            M_j = gathered[j, :, :nM].reshape(B, H, K, V)
            A_j = gathered[j, :, nM:].reshape(A.shape).unsqueeze(-1)    # decays the key rows of S
            S = M_j if S is None else A_j * S + M_j
            if j + 1 == r:
                S_in = S

        # 5. Output correction: o_t += scale * (q_t * decay_t) S_in(r).
        o = o_loc
        if S_in is not None:
            corr = torch.einsum("blhk,bhkv->blhv", q.float() * decay, S_in) * scale
            o = (o_loc.float() + corr).to(o_loc.dtype)
        # Rank 0 does not use the gathered states; its all-gather backward must still run.
        o = anchor(o, gathered)
        return o, (S if output_final_state else None)

    # --- softmax attention --------------------------------------------------------------------------
    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, doc_start: Optional[Tensor] = None,
                  window: Optional[int] = None) -> Tensor:
        if window is not None:
            return self._window_attention(q, k, v, doc_start, window)
        if self.sp_attention == "ulysses":
            return self._ulysses(q, k, v, doc_start)
        return self._lasp2h(q, k, v, doc_start)

    def _ulysses(self, q, k, v, doc_start):
        P = self.sp_size
        H, Hkv = q.shape[2], k.shape[2]
        if H % P:
            raise ValueError(f"ulysses attention: {H} query heads are not divisible by parallel.sp={P} "
                             f"(use parallel.sp_attention=lasp2h)")
        if Hkv % P:
            # GQA with fewer KV heads than ranks: repeat each KV head so every rank gets whole KV
            # heads matching its query heads (repeat_interleave keeps the q-head -> kv-head map).
            f = math.lcm(Hkv, P) // Hkv
            k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
        a2a = lambda t, s, gdim: all_to_all(t, self.group, self.meter, "ulysses", scatter_dim=s, gather_dim=gdim)
        qh, kh, vh = a2a(q, 2, 1), a2a(k, 2, 1), a2a(v, 2, 1)          # [B, T, H/P, D]
        oh = LocalOps.attention(self, qh, kh, vh, doc_start=self._doc_full(doc_start), window=None)
        return a2a(oh, 1, 2)                                           # back to [B, L, H, D]

    def _lasp2h(self, q, k, v, doc_start):
        L, r = q.shape[1], self.sp_rank
        Dk = k.shape[-1]
        kv = all_gather(torch.cat([k, v], -1), self.group, self.meter, "lasp2h", dim=1)
        kv = kv[:, :(r + 1) * L]                     # causal: later ranks' keys are never visible
        doc = self._doc_full(doc_start)
        doc = doc[:, :(r + 1) * L] if doc is not None else None
        return _suffix_attention(q, kv[..., :Dk], kv[..., Dk:], doc, window=None)

    def _window_attention(self, q, k, v, doc_start, window: int):
        h = window - 1
        Dk = k.shape[-1]
        kv = torch.cat([k, v], -1)
        kv = torch.cat([halo(kv, h, self.group, self.meter, "halo_window", dim=1), kv], 1)
        doc = None
        if doc_start is not None:
            doc = torch.cat([self._doc_halo(doc_start, h), doc_start.to(torch.bool)], 1)
        return _suffix_attention(q, kv[..., :Dk], kv[..., Dk:], doc, window=window)

    # --- causal conv --------------------------------------------------------------------------------
    def causal_conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    doc_start: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
        h = weight.shape[-1] - 1                      # weight [D, W]: W-1 inputs of history
        xh = halo(x, h, self.group, self.meter, "halo_conv", dim=1)
        n = xh.shape[1]
        doc = None
        if doc_start is not None:
            doc = torch.cat([self._doc_halo(doc_start, h), doc_start.to(torch.bool)], 1)
        # The halo is exactly the history the part's first tokens see (zero before global token 0),
        # so the local conv over [halo, part] is the global conv on the part.
        y = LocalOps.causal_conv(self, torch.cat([xh, x], 1), weight, bias, doc_start=doc,
                                 activation=activation)
        return y[:, n:]


def _suffix_attention(q: Tensor, k: Tensor, v: Tensor, doc: Optional[Tensor], window: Optional[int]) -> Tensor:
    """Causal attention of the queries at the last Tq of Tk key positions (bottom-right aligned),
    with documents given by doc [B, Tk] over the keys."""
    if doc is None or not bool(doc[:, 1:].any()):
        return kernels.attention(q, k, v, causal=True, window=window)
    Tk = k.shape[1]
    # cu_seqlens packs one row: one call per batch row (Tq < Tk cannot be flattened across rows).
    outs = [kernels.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True, window=window,
                              cu_seqlens=doc_cu_seqlens(doc[b:b + 1], 1, Tk, q.device))
            for b in range(q.shape[0])]
    return torch.cat(outs, 0)
