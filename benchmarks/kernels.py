"""Forward+backward time and peak memory of the GLA backends and softmax attention vs sequence length.

    python benchmarks/kernels.py --quick                       # CPU, T = 1K..4K, a short run
    python benchmarks/kernels.py --out kernels.json            # CPU, T = 1K..64K
    python benchmarks/kernels.py --device cuda --dtype bf16    # GPU: triton vs fla vs flash-attn
    python benchmarks/kernels.py --saved-bytes                 # CPU: activation bytes autograd keeps

--saved-bytes: bytes per token per layer that autograd saves for the triton backend's backward,
counted with torch.autograd.graph.saved_tensors_hooks (distinct storages) on CPU under
TRITON_INTERPRET=1, for every gate kind at H=16, K=V=128 (--dtype, default bf16), today's tree
beside --baseline REV (default: the last revision that saved the fp32 chunk states h), extracted
with git archive. Saved tensors are allocated by the host code, so the kernels are not run unless
--run-kernels (the counts are the same; the interpreter is slow at these shapes).

Every (backend, T) point runs in fresh worker processes, so its peak memory is its own: on CUDA
torch's peak allocated bytes; on CPU the resident-set high-water mark above the inputs (reset
through /proc/self/clear_refs) in a separate 1-rep worker whose malloc hands every large block back
to the OS (that makes allocation slower, so it is not the worker that is timed).
Time is the best of --reps runs after one warm-up (wall clock; the worker's CPU time is stored too,
being steadier on a shared machine). Ratios in the table come from the same run.
Points are skipped (and listed as skipped) where they would take too long: the token-by-token
`recurrent` backend above --recurrent-max-t, softmax attention on CPU above --attention-max-t.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import rss  # benchmarks/rss.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_REV = "a58db28"   # main before the backward recomputed h (it saved fp32 h from the forward)
CPU_T = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
GPU_T = [2048, 4096, 8192, 16384, 32768, 65536, 131072]


# ---------------------------------------------------------------------------------------------
# worker: one measurement in its own process



def _make_inputs(a, torch):
    from lctrain.kernels.testing import gla_inputs
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    q, k, v, g, _ = gla_inputs(a.B, a.T, a.H, a.K, a.V, a.gate, dtype=torch.float32, device=a.device)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return [t.requires_grad_(True) for t in (q, k, v)], (None if g is None else g.requires_grad_(True))


def _step_fn(a, torch):
    """One forward + backward with a fixed output cotangent (no loss ops in the timing)."""
    from lctrain import kernels
    (q, k, v), g = _make_inputs(a, torch)
    do = torch.randn(a.B, a.T, a.H, a.V, device=a.device).to(v.dtype)
    if a.backend == "attention":
        run = lambda: kernels.attention(q, k, v, causal=True)
    elif a.backend.startswith("fla_"):
        from fla.ops.gla import chunk_gla as fla_gla  # type: ignore
        from fla.ops.simple_gla import chunk_simple_gla  # type: ignore
        if a.gate == "key":
            run = lambda: fla_gla(q, k, v, g, scale=a.K ** -0.5)[0]
        else:
            run = lambda: chunk_simple_gla(q, k, v, g, scale=a.K ** -0.5)[0]
    else:
        run = lambda: kernels.gated_linear_attention(q, k, v, g, backend=a.backend)[0]
    leaves = [q, k, v] + ([g] if g is not None and a.backend != "attention" else [])

    def step():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(run(), do)
    return step


def worker(a) -> dict:
    import torch
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    step = _step_fn(a, torch)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.warmup:
        step()
    times = []
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss.reset_peak()
    cpu_times = []
    for _ in range(a.reps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() if a.device == "cuda" else rss.peak()) - base
    return {"time_s": min(times), "times_s": times, "cpu_time_s": min(cpu_times),
            "peak_mem_mb": peak / 2 ** 20}


def saved_bytes_worker(a) -> dict:
    """Bytes the triton backend saves for backward, one forward at T tokens (TRITON_INTERPRET=1)."""
    import torch
    import triton.runtime.interpreter as interp
    from lctrain.kernels import gated_linear_attention
    from lctrain.kernels.testing import gla_inputs
    if not a.run_kernels:
        interp.InterpretedFunction.run = lambda self, *args, **kw: None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    q, k, v, g, _ = gla_inputs(a.B, a.T, a.H, a.K, a.V, a.gate)
    leaves = [None if t is None else t.to(dtype).requires_grad_(True) for t in (q, k, v, g)]
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = (st.nbytes(), list(t.shape), str(t.dtype).replace("torch.", ""))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_linear_attention(*leaves, backend="triton")
    tokens = a.B * a.T
    return {"bytes_per_token": sum(b for b, *_ in saved.values()) / tokens,
            "tensors": sorted(([b / tokens, shape, dt] for b, shape, dt in saved.values()), reverse=True)}


def _baseline_tree(rev: str, tmp: str):
    """lctrain/ of git revision `rev` extracted under tmp (None if git or the revision is missing)."""
    p = subprocess.run(f"git -C {ROOT} archive {rev} lctrain | tar -x -C {tmp}", shell=True,
                       capture_output=True, text=True)
    return tmp if p.returncode == 0 and os.path.isdir(os.path.join(tmp, "lctrain")) else None


def saved_bytes_table(args) -> dict:
    import tempfile
    gates = ["none", "head", "key"]
    trees = {"now": ROOT}
    with tempfile.TemporaryDirectory(prefix="lctrain-baseline-") as tmp:
        base = _baseline_tree(args.baseline, tmp) if args.baseline else None
        if base:
            trees = {f"baseline {args.baseline}": base, "now": ROOT}
        elif args.baseline:
            print(f"note: baseline revision {args.baseline} not available (no git checkout?); now only")
        res = {}
        for name, tree in trees.items():
            for gate in gates:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker-saved", "--gate", gate,
                       "--T", str(args.T[0] if args.T else 64), "--B", str(args.B), "--H", str(args.H),
                       "--K", str(args.K), "--V", str(args.V), "--dtype", args.dtype] \
                    + (["--run-kernels"] if args.run_kernels else [])
                env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=tree)
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.point_timeout,
                                   cwd=tree)
                out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else \
                    {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
                res.setdefault(gate, {})[name] = out
    names = list(trees)
    kib = lambda r: f"{r['bytes_per_token'] / 1024:.2f}" if "bytes_per_token" in r else "error"
    print(f"saved activation bytes per token per layer (KiB), triton backend, dtype={args.dtype} "
          f"H={args.H} K={args.K} V={args.V}, T={args.T[0] if args.T else 64}")
    head = ["gate"] + names + (["saved less"] if len(names) == 2 else []) + ["largest saved tensors now"]
    rows = []
    for gate in gates:
        r = res[gate]
        row = [gate] + [kib(r[n]) for n in names]
        if len(names) == 2:
            ok = all("bytes_per_token" in r[n] for n in names)
            row.append(f"{(r[names[0]]['bytes_per_token'] - r['now']['bytes_per_token']) / 1024:.2f}"
                       if ok else "-")
        row.append(", ".join(f"{dt}{shape}" for _, shape, dt in r["now"].get("tensors", [])[:5]))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return res


# ---------------------------------------------------------------------------------------------
# driver

def fwd_flops(backend: str, B, T, H, K, V, chunk=64) -> float:
    """Matmul FLOPs of one forward (causal attention: half the score matrix)."""
    if backend == "attention":
        return 2.0 * B * H * T * T * (K + V) / 2
    return 2.0 * B * H * T * (chunk * (K + V) / 2 + 2 * K * V)


def _spawn(args, backend: str, T: int, *, reps: int, warmup: bool, memory: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", backend, "--T", str(T),
           "--B", str(args.B), "--H", str(args.H), "--K", str(args.K), "--V", str(args.V),
           "--gate", args.gate, "--dtype", args.dtype, "--device", args.device,
           "--reps", str(reps), "--threads", str(args.threads)] + (["--warmup"] if warmup else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if memory:   # every large block from mmap, so a free really lowers the RSS (slows allocation)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.point_timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_point(args, backend: str, T: int) -> dict:
    """Timing with the default allocator; on CPU the peak memory from a second, 1-rep worker."""
    slow = backend == "recurrent"
    r = _spawn(args, backend, T, reps=1 if slow else args.reps, warmup=not slow, memory=False)
    if args.device == "cpu" and "time_s" in r:
        r["peak_mem_mb"] = _spawn(args, backend, T, reps=1, warmup=True, memory=True).get("peak_mem_mb")
    return r


def skipped(args, backend: str, T: int):
    if backend == "recurrent" and T > args.recurrent_max_t:
        return f"recurrent skipped above T={args.recurrent_max_t} (token loop, O(T) Python steps)"
    if backend == "attention" and args.device == "cpu" and T > args.attention_max_t:
        return f"attention skipped above T={args.attention_max_t} on CPU (O(T^2) time)"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--T", type=int, nargs="*", help="sequence lengths (default: 1K..64K CPU, 2K..128K GPU)")
    ap.add_argument("--quick", action="store_true", help="T = 1K, 2K, 4K and 2 reps")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--gate", default="head", choices=["none", "head", "key"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--backends", nargs="*", help="default: chunk recurrent attention (CPU); "
                                                  "triton fla attention (CUDA)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads per worker")
    ap.add_argument("--recurrent-max-t", type=int, default=4096)
    ap.add_argument("--attention-max-t", type=int, default=16384)
    ap.add_argument("--point-timeout", type=int, default=1800)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--saved-bytes", action="store_true", help="saved activation bytes per token "
                    "(CPU, interpreter) for every gate kind, today vs --baseline; H=16, K=V=128 default")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision for the saved-bytes "
                    "comparison ('' for none)")
    ap.add_argument("--run-kernels", action="store_true", help="--saved-bytes: run the kernels too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-saved", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_saved:
        args.T = args.T[0]
        print(json.dumps(saved_bytes_worker(args)))
        return
    if args.saved_bytes:
        args.dtype = args.dtype or "bf16"
        if not any(a.startswith(("--H", "--K", "--V")) for a in sys.argv[1:]):
            args.H, args.K, args.V = 16, 128, 128
        res = saved_bytes_table(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"config": {k: v for k, v in vars(args).items()}, "saved_bytes": res}, f, indent=2)
            print("wrote", args.out)
        return
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.worker:
        args.T = args.T[0]
        print(json.dumps(worker(args)))
        return

    cpu = args.device == "cpu"
    Ts = args.T or ([1024, 2048, 4096] if args.quick else (CPU_T if cpu else GPU_T))
    if args.quick:
        args.reps = min(args.reps, 2)
    backends = args.backends or (["chunk", "recurrent", "attention"] if cpu
                                 else ["triton", "fla_" + args.gate, "attention"])
    if cpu and "triton" in backends:
        print("note: the triton backend is not timed on CPU (the interpreter is a correctness tool)")
        backends = [b for b in backends if b != "triton"]
    main_b = backends[0]
    results, notes = {}, set()
    for T in Ts:
        for b in backends:
            why = skipped(args, b, T)
            if why:
                notes.add(why)
                continue
            r = run_point(args, b, T)
            if "time_s" in r:
                r["tflops"] = 3 * fwd_flops(b, args.B, T, args.H, args.K, args.V) / r["time_s"] / 1e12
            results.setdefault(T, {})[b] = r
            status = f"{r['time_s'] * 1e3:10.1f} ms {r['peak_mem_mb']:9.1f} MB" if "time_s" in r else r["error"]
            print(f"  T={T:6d} {b:10s} {status}", file=sys.stderr, flush=True)

    # table: time and memory per backend, then ratios against the first backend, from this run
    t = lambda T, b, key="time_s": results.get(T, {}).get(b, {}).get(key)
    head = ["T"] + [f"{b} ms" for b in backends] + [f"{main_b} cpu ms"] \
        + [f"{b}/{main_b}" for b in backends[1:]] + [f"{b} MB" for b in backends] + [f"{main_b} scaling"]
    rows = []
    ref_T = 4096 if 4096 in Ts else Ts[0]
    for T in Ts:
        row = [str(T)]
        row += [f"{t(T, b) * 1e3:.1f}" if t(T, b) else "-" for b in backends]
        row.append(f"{t(T, main_b, 'cpu_time_s') * 1e3:.1f}" if t(T, main_b, "cpu_time_s") else "-")
        row += [f"{t(T, b) / t(T, main_b):.2f}" if t(T, b) and t(T, main_b) else "-" for b in backends[1:]]
        row += [f"{t(T, b, 'peak_mem_mb'):.0f}" if t(T, b, "peak_mem_mb") is not None else "-" for b in backends]
        sc = t(T, main_b) / (T / ref_T * t(ref_T, main_b)) if t(T, main_b) and t(ref_T, main_b) else None
        row.append(f"{sc:.2f}" if sc else "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(f"GLA fwd+bwd, device={args.device} dtype={args.dtype} gate={args.gate} B={args.B} H={args.H} "
          f"K={args.K} V={args.V} threads={args.threads if cpu else '-'} (best of {args.reps})")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"({main_b} scaling = time(T) / (T/{ref_T} * time({ref_T})); 1.00 is linear)")
    for n in sorted(notes):
        print("note:", n)

    targets = {}
    for key, what in (("time_s", "wall"), ("cpu_time_s", "cpu")):
        if cpu and t(4096, "chunk", key) and t(4096, "recurrent", key):
            r = targets[f"chunk_speedup_vs_recurrent_T4096_{what}"] = t(4096, "recurrent", key) / t(4096, "chunk", key)
            print(f"target ({what} time): chunk vs recurrent at T=4096: {r:.1f}x faster (want >= 5x)")
        if t(65536, main_b, key) and t(4096, main_b, key):
            r = targets[f"time64K_over_16x_time4K_{what}"] = t(65536, main_b, key) / (16 * t(4096, main_b, key))
            print(f"target ({what} time): {main_b} time(64K) / (16 * time(4K)) = {r:.3f} (want <= 1.15)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("worker", "backend", "warmup")},
                       "backends": backends, "results": results, "targets": targets,
                       "notes": sorted(notes)}, f, indent=2)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
