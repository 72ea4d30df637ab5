"""Sequence-parallel communication and scaling.

    python benchmarks/sequence_parallel.py [--global-len 4096] [--steps 3] [--skip-measure] [--skip-scaling]

1. Bytes per layer per rank (forward + backward of one training step) for LASP-2, Ulysses, LASP-2H
   and halo exchange as the sequence grows 1K -> 64K at P = 2, 4: analytic, from the message shapes
   the implementation sends (lctrain.parallel.costs). Reference layer: d_model 1024, 16 heads of 64,
   bf16 activations, batch 1 per rank group; LASP-2 on a GLA-style layer (16 heads, K = V = 64,
   per-key gate, fp32 states).
2. The same quantities measured through `ParallelContext.pop_comm_bytes` on gloo for small shapes,
   side by side with the analytic numbers for those shapes (they must agree exactly).
3. Time per step and per-rank memory vs SP size at a fixed global sequence length on CPU (gloo):
   tiny models, so this shows how per-rank work and activation memory split, not GPU throughput.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lctrain.parallel import costs  # noqa: E402

# reference layer for the analytic table
B, H, HKV, D, ELT = 1, 16, 16, 64, 2
LIN_H, LIN_K, LIN_V = 16, 64, 64
WINDOW, CONV_W, CONV_D = 512, 4, 2048


def _mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def analytic_table():
    print("## 1. Bytes per layer per rank, forward + backward (analytic, MiB)")
    print(f"attention: {H} heads x {D}, {HKV} KV heads, bf16; LASP-2: {LIN_H} heads, K=V={LIN_K}, per-key gate, fp32 "
          f"state; halo: window W={WINDOW} (K,V), conv k={CONV_W} over {CONV_D} channels\n")
    print(f"| P | T      | LASP-2    | Ulysses   | LASP-2H   | halo W    | halo conv | LASP-2/Ulysses |")
    print(f"|---|--------|-----------|-----------|-----------|-----------|-----------|----------------|")
    for P in (2, 4):
        for T in (1024, 4096, 16384, 65536):
            L = T // P
            lasp2 = costs.lasp2_bytes(B, LIN_H, LIN_K, LIN_V, "key", P)
            uly = costs.ulysses_bytes(B, L, H, HKV, D, P, ELT)
            l2h = costs.lasp2h_bytes(B, L, HKV, D, P, ELT)
            hw = max(costs.halo_window_bytes(B, L, HKV, D, WINDOW, P, r, ELT) for r in range(P))
            hc = max(costs.halo_conv_bytes(B, L, CONV_D, CONV_W, P, r, ELT) for r in range(P))
            print(f"| {P} | {T:6d} | {_mib(lasp2)} | {_mib(uly)} | {_mib(l2h)} | {_mib(hw)} | {_mib(hc)} | "
                  f"{lasp2 / uly:14.4f} |")
    print("\nLASP-2 sends one [B,H,K,V] state + decay per rank regardless of T; Ulysses and LASP-2H grow "
          "linearly in T; halo traffic is bounded by W-1 (k-1) tokens per rank boundary.\n")


# --- 2. measured --------------------------------------------------------------------------------------

M_B, M_H, M_HKV, M_D, M_K, M_V, M_CONV_D, M_CONV_W, M_WINDOW = 1, 4, 2, 16, 16, 16, 32, 4, 64


def _measure_worker(rank, world, lengths):
    import torch
    from lctrain.config import ParallelConfig
    from lctrain.parallel import SequenceParallelOps, init_parallel
    pc = init_parallel(ParallelConfig(sp=world, timeout_s=120), "cpu")
    l2h = SequenceParallelOps(pc.sp_group, "lasp2h", meter=pc.comm_meter)
    out = {}
    for T in lengths:
        L = T // world
        leaf = lambda *s: torch.randn(*s).requires_grad_(True)
        q, k = leaf(M_B, L, M_H, M_D), leaf(M_B, L, M_HKV, M_D)
        ql, vl, g = leaf(M_B, L, M_H, M_K), leaf(M_B, L, M_H, M_V), (-torch.rand(M_B, L, M_H, M_K)).requires_grad_(True)
        x, w = leaf(M_B, L, M_CONV_D), leaf(M_CONV_D, M_CONV_W)
        runs = {
            "lasp2": lambda: pc.seq_ops.linear_attention(ql, ql, vl, g)[0],
            "ulysses": lambda: pc.seq_ops.attention(q, k, k),
            "lasp2h": lambda: l2h.attention(q, k, k),
            "halo_window": lambda: pc.seq_ops.attention(q, k, k, window=M_WINDOW),
            "halo_conv": lambda: pc.seq_ops.causal_conv(x, w),
        }
        for kind, fn in runs.items():
            pc.pop_comm_bytes()
            fn().float().sum().backward()
            out[(T, kind)] = pc.pop_comm_bytes().get(kind, 0)
    pc.shutdown()
    return out


def measured_table(lengths=(256, 1024, 4096)):
    from tests.dist_utils import run_workers
    print("## 2. Measured through pop_comm_bytes (gloo, fp32, small shapes) vs analytic, bytes, rank 0")
    print(f"attention {M_H} heads x {M_D}, {M_HKV} KV heads; LASP-2 {M_H} heads K=V={M_K} per-key gate; "
          f"window W={M_WINDOW}; conv k={M_CONV_W} x {M_CONV_D}\n")
    print("| P | T    | kind        | measured | analytic | equal |")
    print("|---|------|-------------|----------|----------|-------|")
    ok = True
    for P in (2, 4):
        res = run_workers(_measure_worker, P, lengths, timeout=300)
        for T in lengths:
            L = T // P
            want = {
                "lasp2": costs.lasp2_bytes(M_B, M_H, M_K, M_V, "key", P),
                "ulysses": costs.ulysses_bytes(M_B, L, M_H, M_HKV, M_D, P, 4),
                "lasp2h": costs.lasp2h_bytes(M_B, L, M_HKV, M_D, P, 4),
                "halo_window": costs.halo_window_bytes(M_B, L, M_HKV, M_D, M_WINDOW, P, 0, 4),
                "halo_conv": costs.halo_conv_bytes(M_B, L, M_CONV_D, M_CONV_W, P, 0, 4),
            }
            for kind, a in want.items():
                m = res[0][(T, kind)]
                ok &= m == a
                print(f"| {P} | {T:4d} | {kind:11s} | {m:8d} | {a:8d} | {'yes' if m == a else 'NO':5s} |")
    print(f"\nall measured == analytic: {ok}\n")
    return ok


# --- 3. time and memory vs SP size ----------------------------------------------------------------

SCALING_MODELS = {
    "gla": {"arch": "gla", "vocab_size": 256, "d_model": 64, "n_layers": 2, "mixers": {"gla": {"n_heads": 2}}},
    "transformer": {"arch": "transformer", "vocab_size": 256, "d_model": 64, "n_layers": 2,
                    "mixers": {"attention": {"n_heads": 4}}},
}


def _scaling_worker(rank, world, sp, name, T, steps):
    import torch
    import torch.nn.functional as F
    from lctrain.config import ParallelConfig
    from lctrain.models import SeqContext, build_config, build_model
    from lctrain.parallel import init_parallel
    pc = init_parallel(ParallelConfig(sp=sp, timeout_s=300), "cpu")
    torch.manual_seed(0)
    model = build_model(build_config(dict(SCALING_MODELS[name])))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, T + 1), generator=gen)
    ids, labels = pc.shard_sequence(tokens[:, :-1]), pc.shard_sequence(tokens[:, 1:])
    seen, saved = set(), [0]                # storages autograd keeps for backward (each counted once)

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            saved[0] += st.nbytes()
        return t

    def step():
        logits = model(ids, SeqContext(ops=pc.seq_ops)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / T
        loss.backward()
        pc.all_reduce_grads(model.parameters())
        model.zero_grad(set_to_none=True)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()                              # warm-up; also measures the saved activations
    times = []
    for _ in range(steps):
        pc.barrier()
        t0 = time.perf_counter()
        step()
        pc.barrier()
        times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    comm = pc.pop_comm_bytes()
    pc.shutdown()
    return {"time": sorted(times)[len(times) // 2], "saved": saved[0], "rss_growth": (rss1 - rss0) * 1024,
            "comm": sum(v for k, v in comm.items() if k != "grad_allreduce") / (steps + 1)}


def scaling_table(T: int, steps: int):
    from tests.dist_utils import run_workers
    print(f"## 3. Time per step and memory per rank vs SP size (CPU, gloo, global T = {T}, batch 1, fp32)")
    print("tiny models (d_model 64, 2 layers); one torch thread per rank\n")
    print("| model       | SP | step s (median) | saved activations MiB/rank | peak RSS growth MiB/rank | SP bytes/step/rank |")
    print("|-------------|----|-----------------|----------------------------|--------------------------|--------------------|")
    for name in SCALING_MODELS:
        for sp in (1, 2, 4):
            res = run_workers(_scaling_worker, sp, sp, name, T, steps, timeout=600)
            step_t = max(r["time"] for r in res)
            saved = max(r["saved"] for r in res)
            rss = max(r["rss_growth"] for r in res)
            comm = max(r["comm"] for r in res)
            print(f"| {name:11s} | {sp:2d} | {step_t:15.3f} | {saved / 2**20:26.1f} | {rss / 2**20:24.1f} | "
                  f"{comm:18.0f} |")
    print(f"\nCPU figures: {os.cpu_count()} cores shared by every rank (and by other users), so step times "
          "show per-rank work only while ranks <= free cores, never GPU throughput or interconnect cost "
          "(gloo over loopback). 'Saved activations' counts the tensors autograd keeps for backward "
          "(exact and deterministic): it is what SP divides. Peak RSS growth is the allocator's view, noisy.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--global-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    analytic_table()
    ok = True
    if not args.skip_measure:
        ok = measured_table()
    if not args.skip_scaling:
        scaling_table(args.global_len, args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
