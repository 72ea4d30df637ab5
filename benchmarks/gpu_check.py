"""One GPU acceptance command for the Triton GLA kernels: correctness, kernel speed and memory vs fla
and flash attention, and a few training steps, in one JSON and one short table.

    python benchmarks/gpu_check.py --out DIR             # one H100 / H200 (bf16), aims at < 8 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run   # CPU: the same logic at toy sizes (interpreter)

Needs only this checkout, torch and triton (fla is used when importable; nothing else is imported
unless a part needs it). Writes DIR/gpu_check.json and DIR/gpu_check.md; exits 1 when a correctness
case fails or a part errors.

(a) every case of lctrain.kernels.testing.TRITON_CASES and PRODUCTION_CASES, compiled on CUDA, in
    fp32 / fp16 / bf16 against the torch chunk path (fp32 on the same inputs): outputs, final states
    and the gradients of q, k, v, g and the initial state, as relative errors ||x - ref|| / ||ref||
    (bounds: fp32 1e-4, fp16 1e-2, bf16 2e-2). Cases are sharded over --jobs processes, so the
    kernels compile in parallel.
(b) forward + backward time (CUDA events, median of --reps interleaved repetitions) and peak memory
    above the inputs, bf16, B=1, H=16, at T = 2K..64K: ours vs fla's chunk_simple_gla (per-head gate,
    K = V = 128; and Mamba-2's K = 128, V = 64) and chunk_gla (per-key gate, K = V = 128), and torch
    SDPA with the flash backend (causal, head dim 128). Autotuning happens in a warm-up call per shape.
(c) --steps training steps (model forward + backward + fused AdamW, bf16 autocast, random tokens,
    batch 1) of recipes/mamba2-370m.yaml and recipes/gla-340m.yaml at seq_len 8192, each in its own
    process: tokens/s, MFU (model FLOPs per token x tokens/s / the device's dense bf16 peak) and
    peak memory; the first two steps are warm-up (compilation, autotuning) and not timed.

--dry-run runs (a) on a few cases in fp32 / fp16 under TRITON_INTERPRET=1, (b) at T = 64 with
H = 2, K = V = 16, one repetition (SDPA with the math backend, fla skipped) and (c) with the -cpu
recipes at seq_len 128: it checks the script's logic, not the GPU, and its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}
GPU_T = [2048, 4096, 8192, 16384, 32768, 65536]
SHAPES = [("head", 128, 128), ("key", 128, 128), ("head", 128, 64)]     # gate, K, V
MODELS = ["mamba2-370m", "gla-340m"]


def _torch():
    import torch
    return torch


def _dtype(name):
    torch = _torch()
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------------------
# (a) correctness

def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_case(name: str, case: dict, dtype: str, device: str) -> dict:
    from lctrain.kernels.testing import case_inputs, run_with_grads
    q, k, v, g, s0, cu = case_inputs(case, dtype=_dtype(dtype), device=device)
    f = lambda t: None if t is None else t.float()
    ref = run_with_grads(f(q), f(k), f(v), f(g), s0, backend="chunk", cu_seqlens=cu)
    out = run_with_grads(q, k, v, g, s0, backend="triton", cu_seqlens=cu)
    errs = {"o": rel_err(out[0], ref[0]), "final_state": rel_err(out[1], ref[1])}
    errs.update({f"d{n}": rel_err(out[2][n], ref[2][n]) for n in ref[2]})
    finite = all(bool(_torch().isfinite(t).all()) for t in [out[0], out[1], *out[2].values()])
    worst = max(errs.values())
    return {"case": name, "dtype": dtype, "errors": errs, "worst": worst, "finite": finite,
            "ok": finite and worst <= TOL[dtype]}


def part_a_worker(a) -> list:
    from lctrain.kernels.testing import PRODUCTION_CASES, TRITON_CASES
    cases = dict(TRITON_CASES, **PRODUCTION_CASES)
    names = sorted(cases)[a.shard::a.nshards] if not a.dry_run else DRY_CASES
    dtypes = ["fp32", "fp16"] if a.dry_run else ["fp32", "fp16", "bf16"]
    out = []
    for n in names:
        for dt in dtypes:
            try:
                out.append(check_case(n, cases[n], dt, a.device))
            except Exception as e:  # noqa: BLE001 - a crash is a failed case, reported with its cause
                out.append({"case": n, "dtype": dt, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
    return out


DRY_CASES = ["basic-key-s0", "varlen-head", "blocks-head"]


def part_a(a) -> list:
    n = 1 if a.dry_run else a.jobs
    procs = [_spawn(a, ["--worker-a", "--shard", str(i), "--nshards", str(n)]) for i in range(n)]
    res = []
    for p in procs:
        res += _collect(p)
    return res


# ---------------------------------------------------------------------------------------------
# (b) kernel speed and memory

def _bench_fns(gate: str, T: int, H: int, K: int, V: int, device: str, dtype, dry: bool) -> dict:
    """name -> zero-argument fwd+bwd step, for ours, fla (when importable) and SDPA."""
    torch = _torch()
    import torch.nn.functional as F
    from lctrain.kernels import gated_linear_attention
    from lctrain.kernels.testing import gla_inputs
    q, k, v, g, _ = gla_inputs(1, T, H, K, V, gate, device=device)
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    g = g.to(dtype).requires_grad_(True)
    do = torch.randn(1, T, H, V, device=device, dtype=dtype)
    scale = K ** -0.5

    def step(fn, leaves, cot):
        def run():
            for t in leaves:
                t.grad = None
            torch.autograd.backward(fn(), cot)
        run.leaves = leaves
        return run
    fns = {"ours": step(lambda: gated_linear_attention(q, k, v, g, scale=scale, backend="triton")[0],
                        [q, k, v, g], do)}
    if not dry:
        try:
            if gate == "key":
                from fla.ops.gla import chunk_gla
                fns["fla"] = step(lambda: chunk_gla(q, k, v, g, scale=scale)[0], [q, k, v, g], do)
            else:
                from fla.ops.simple_gla import chunk_simple_gla
                fns["fla"] = step(lambda: chunk_simple_gla(q, k, v, g, scale=scale)[0], [q, k, v, g], do)
        except ImportError:
            pass
    if K == V:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qa, ka, va = (torch.randn(1, H, T, K, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        doa = torch.randn(1, H, T, V, device=device, dtype=dtype)
        backend = SDPBackend.MATH if dry else SDPBackend.FLASH_ATTENTION

        def sdpa():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
        fns["sdpa_flash" if not dry else "sdpa_math"] = step(sdpa, [qa, ka, va], doa)
    return fns


def _time_ms(fn, cuda: bool) -> float:
    torch = _torch()
    if cuda:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _peak_mb(fn, cuda: bool):
    torch = _torch()
    if not cuda:
        return None
    for t in fn.leaves:              # the base holds the inputs only, not the last step's gradients
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def part_b(a, deadline: float) -> list:
    torch = _torch()
    cuda = a.device == "cuda"
    dtype = _dtype("fp32" if a.dry_run else "bf16")
    H = 2 if a.dry_run else 16
    shapes = [(g, 16, 16) for g in ("head", "key")] if a.dry_run else SHAPES
    Ts = a.T or ([64] if a.dry_run else GPU_T)
    reps = 1 if a.dry_run else a.reps
    rows = []
    for gate, K, V in shapes:
        for T in Ts:
            if time.time() > deadline:
                rows.append({"gate": gate, "K": K, "V": V, "T": T, "skipped": "time budget"})
                continue
            try:
                fns = _bench_fns(gate, T, H, K, V, a.device, dtype, a.dry_run)
                for fn in fns.values():     # warm-up: compile, autotune
                    fn()
                times = {n: [] for n in fns}
                for _ in range(reps):        # interleaved repetitions
                    for n, fn in fns.items():
                        times[n].append(_time_ms(fn, cuda))
                row = {"gate": gate, "K": K, "V": V, "T": T, "H": H}
                for n, fn in fns.items():
                    row[f"{n}_ms"] = statistics.median(times[n])
                    row[f"{n}_peak_mb"] = _peak_mb(fn, cuda)
                del fns
            except Exception as e:  # noqa: BLE001 - an out-of-memory point is a result, not a crash
                row = {"gate": gate, "K": K, "V": V, "T": T, "error": f"{type(e).__name__}: {e}"[:300]}
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"  (b) {row}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# (c) training steps

def part_c_worker(a) -> dict:
    torch = _torch()
    from lctrain.config import load_recipe_dict, recipe_from_dict
    from lctrain.models import build_model
    from lctrain.train.metrics import device_peak_flops
    raw = load_recipe_dict(os.path.join(ROOT, "recipes", a.model + ".yaml"))
    raw["model"].setdefault("vocab_size", raw.get("tokenizer", {}).get("vocab_size", 32000))  # -cpu recipes
    recipe = recipe_from_dict(raw)
    dev = torch.device(a.device)
    model = build_model(recipe.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    V = recipe.model.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, V, (1, a.seq_len + 1), generator=gen).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    losses, times = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = times[2:] if len(times) > 2 else times
    tps = a.seq_len / statistics.median(timed)
    fpt = model.flops_per_token(a.seq_len)
    peak = device_peak_flops(dev)
    return {"model": a.model, "seq_len": a.seq_len, "steps": a.steps, "timed_steps": len(timed),
            "params": model.num_params(), "tokens_per_s": tps, "flops_per_token": fpt,
            "mfu": tps * fpt / peak if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None,
            "losses": losses, "ok": all(l == l and abs(l) != float("inf") for l in losses)}


def part_c(a) -> list:
    res = []
    for m in MODELS:
        model = m.split("-")[0] + "-cpu" if a.dry_run else m
        p = _spawn(a, ["--worker-c", "--model", model, "--seq-len", str(128 if a.dry_run else a.seq_len)]
                   + (["--steps", "3"] if a.dry_run else []))
        res += _collect(p)
    return res


# ---------------------------------------------------------------------------------------------
# driver

def _spawn(a, extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--out", a.out, "--device", a.device,
           "--steps", str(a.steps)] + (["--dry-run"] if a.dry_run else []) + extra
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(p) -> list:
    out, err = p.communicate()
    if p.returncode != 0:
        return [{"ok": False, "error": (err or out).strip().splitlines()[-3:]}]
    r = json.loads(out.strip().splitlines()[-1])
    return r if isinstance(r, list) else [r]


def environment(a) -> dict:
    torch = _torch()
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "device": a.device,
           "dry_run": a.dry_run, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import fla
        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        env["fla"] = None
    return env


def table(res: dict) -> str:
    L = []
    e = res["env"]
    L.append(f"# gpu_check: {e.get('gpu', e['device'])}, torch {e['torch']}, triton {e['triton']}, fla {e['fla']}"
             + (" (DRY RUN on CPU: logic only)" if e["dry_run"] else ""))
    a = res.get("a")
    if a is not None:
        bad = [r for r in a if not r.get("ok")]
        L.append(f"\n(a) correctness vs chunk path: {len(a) - len(bad)}/{len(a)} case x dtype passed")
        for dt in TOL:
            errs = [r["worst"] for r in a if r.get("dtype") == dt and "worst" in r]
            if errs:
                L.append(f"    {dt}: worst relative error {max(errs):.2e} (bound {TOL[dt]:.0e}) over {len(errs)} cases")
        for r in bad:
            L.append(f"    FAIL {r.get('case')} {r.get('dtype')}: {r.get('error') or r.get('errors')}")
    b = res.get("b")
    if b:
        L.append("\n(b) fwd+bwd, median ms / peak MB above inputs")
        cols = ["ours", "fla", "sdpa_flash", "sdpa_math"]
        L.append("| gate | K | V | T | " + " | ".join(f"{c} ms | {c} MB" for c in cols) + " | ours/fla | ours/sdpa |")
        L.append("|" + "---|" * (4 + 2 * len(cols) + 2))
        for r in b:
            if "error" in r or "skipped" in r:
                L.append(f"| {r['gate']} | {r['K']} | {r['V']} | {r['T']} | {r.get('error') or r['skipped']} |")
                continue
            f = lambda x: "-" if x is None else f"{x:.2f}" if x < 100 else f"{x:.0f}"
            cells = [f"{f(r.get(c + '_ms'))} | {f(r.get(c + '_peak_mb'))}" for c in cols]
            sd = r.get("sdpa_flash_ms") or r.get("sdpa_math_ms")
            L.append(f"| {r['gate']} | {r['K']} | {r['V']} | {r['T']} | " + " | ".join(cells)
                     + f" | {f(r['ours_ms'] / r['fla_ms']) if r.get('fla_ms') else '-'}"
                     + f" | {f(r['ours_ms'] / sd) if sd else '-'} |")
    c = res.get("c")
    if c:
        L.append("\n(c) training steps (batch 1, random tokens)")
        L.append("| model | seq_len | tokens/s | MFU | peak GB | losses |")
        L.append("|---|---|---|---|---|---|")
        for r in c:
            if "tokens_per_s" not in r:
                L.append(f"| {r.get('model', '?')} | error: {r.get('error')} |")
                continue
            mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "-"
            pk = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] else "-"
            L.append(f"| {r['model']} | {r['seq_len']} | {r['tokens_per_s']:.0f} | {mfu} | {pk} | "
                     f"{', '.join(f'{x:.3f}' for x in r['losses'])} |")
    L.append(f"\ntotal {res['wall_s']:.0f} s")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreter, toy sizes: checks the logic")
    ap.add_argument("--parts", nargs="*", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--jobs", type=int, default=8, help="(a) processes (kernels compile in parallel)")
    ap.add_argument("--T", type=int, nargs="*", help="(b) sequence lengths (default 2K..64K)")
    ap.add_argument("--reps", type=int, default=5, help="(b) interleaved repetitions")
    ap.add_argument("--steps", type=int, default=6, help="(c) training steps (2 untimed)")
    ap.add_argument("--seq-len", type=int, default=8192, help="(c) sequence length")
    ap.add_argument("--budget-s", type=float, default=420, help="(b) skips points started after this")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-a", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-c", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--nshards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported
    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    if a.worker_a or a.worker_c:
        torch = _torch()
        torch.manual_seed(0)
        print(json.dumps(part_a_worker(a) if a.worker_a else part_c_worker(a)))
        return 0
    torch = _torch()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the logic on CPU)", file=sys.stderr)
        return 2
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    res = {"env": environment(a), "args": {k: v for k, v in vars(a).items() if not k.startswith(("worker", "shard", "nshards", "model"))}}
    if "a" in a.parts:
        res["a"] = part_a(a)
        print(f"(a) done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if "b" in a.parts:
        res["b"] = part_b(a, t0 + a.budget_s)
        print(f"(b) done at {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if "c" in a.parts:
        res["c"] = part_c(a)
    res["wall_s"] = time.time() - t0
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=2)
    text = table(res)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    failed = [r for r in res.get("a", []) + res.get("c", []) if not r.get("ok")] \
        + [r for r in res.get("b", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
