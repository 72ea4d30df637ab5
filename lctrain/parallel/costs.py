"""Bytes one rank sends per layer under sequence parallelism, from the message shapes that
`lctrain.parallel.seqops` actually sends (forward + backward of one training step; the tests check
these against `ParallelContext.pop_comm_bytes`). L = tokens per rank, P = SP size, `elt` = bytes per
activation element. Conventions of "bytes sent" are in comm.py.
"""
from __future__ import annotations

import math


def lasp2_bytes(B: int, H: int, K: int, V: int, gate: str, P: int) -> int:
    """One all-gather of (M_r [B,H,K,V], A_r) in fp32 forward, its reduce-scatter backward: no L."""
    decay = {"none": 1, "head": H, "key": H * K}[gate]
    return 2 * (P - 1) * B * (H * K * V + decay) * 4


def ulysses_bytes(B: int, L: int, H: int, Hkv: int, D: int, P: int, elt: int) -> int:
    """Four all-to-alls (q, k, v in; o out), each sending (P-1)/P of its input; same in backward.
    KV heads are repeated up to lcm(Hkv, P) when Hkv is not a multiple of P."""
    hkv = Hkv if Hkv % P == 0 else math.lcm(Hkv, P)
    per_head = B * L * D * elt
    return 2 * sum(per_head * h * (P - 1) // P for h in (H, hkv, hkv, H))


def lasp2h_bytes(B: int, L: int, Hkv: int, D: int, P: int, elt: int) -> int:
    """One all-gather of [K, V] forward, its reduce-scatter backward."""
    return 2 * (P - 1) * B * L * Hkv * 2 * D * elt


def halo_tokens(L: int, h: int, P: int, r: int) -> int:
    """Tokens rank r sends to later ranks for a halo of h tokens (window W: h = W-1; conv k: h = k-1)."""
    sent = 0
    for s in range(r + 1, P):
        lo, hi = max(r * L, s * L - h), min((r + 1) * L, s * L)
        sent += max(0, hi - lo)
    return sent


def halo_window_bytes(B: int, L: int, Hkv: int, D: int, window: int, P: int, r: int, elt: int) -> int:
    """K and V of the W-1 tokens before each later rank's part, and their gradients back."""
    return 2 * halo_tokens(L, window - 1, P, r) * B * Hkv * 2 * D * elt


def halo_conv_bytes(B: int, L: int, D: int, width: int, P: int, r: int, elt: int) -> int:
    """The k-1 conv inputs before each later rank's part, and their gradients back."""
    return 2 * halo_tokens(L, width - 1, P, r) * B * D * elt
