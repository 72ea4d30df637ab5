"""Ahead-of-time compile check of the Triton GLA kernels for Hopper (sm_90) and Ampere (sm_80), on a
machine without a GPU.

    python scripts/triton_compile_check.py            # CI: the test cases' launches, fp32 + bf16
    python scripts/triton_compile_check.py --full     # + fp16, bf16 q/k/v with fp32 gates,
                                                      #   production head shapes, every autotune config

The launches are recorded from the real host code (lctrain.kernels.testing.record_launches with the
kernels not run) for every case of TRITON_CASES (the interpreter tests' cases), forward and backward,
so the signatures, constexprs and grids are exactly the ones a GPU run makes. Each distinct launch is
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) down to a cubin
(ptxas included). The CI mode compiles one launch per kernel, dtypes and flag constexprs (GATE,
HAS_S0, ..., PREC) with the first autotune config, plus every autotune config of the production
shapes (K = V = 128, gates per head and per key, bf16) for sm_90; --full compiles every distinct
launch of every case with every config. Any compiler error fails the run (exit 1) with the kernel, the
dtypes, the constexprs and the first lines of the error. A fresh TRITON_CACHE_DIR is used unless
--cache-dir is given, so everything is compiled for real.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":     # compiling needs real JIT functions, not interpreted ones
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable] + sys.argv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = (90, 80)
SMEM_MAX = {90: 232448, 80: 166912, 89: 101376, 86: 101376}   # bytes of shared memory per block (opt-in max)


def _type(x, torch) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.int32: "i32", torch.int64: "i64"}[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2 ** 31 <= x < 2 ** 31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(x).__name__}")


def launch_specs(records, *, all_configs: bool, by_code_path: bool):
    """Distinct (jit function, signature, constexprs, attrs, num_warps, num_stages) of recorded
    launches, with every autotune config (all_configs) or the first one. by_code_path: one launch per
    kernel, dtypes and flag constexprs (the first recorded; others differ only in H, K, V)."""
    import torch
    from triton.runtime.autotuner import Autotuner

    from lctrain.kernels.gla_triton_fwd import clamp_configs
    specs = {}
    for kernel, _grid, args, meta in records:
        jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        names = jit.arg_names
        vals = dict(zip(names, args), **meta)
        cfgs = clamp_configs(kernel.configs, vals) if isinstance(kernel, Autotuner) else [None]
        for c in (cfgs if all_configs else cfgs[:1]):
            v = dict(vals, **(c.kwargs if c else {}))
            const = {n: v[n] for i, n in enumerate(names) if jit.params[i].is_constexpr}
            sig = {n: ("constexpr" if n in const else _type(v[n], torch)) for n in names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
            warps, stages = (c.num_warps, c.num_stages) if c else (4, 2)
            shape = ("H", "K", "V", "BK", "BV") if by_code_path else ()
            key = (jit.__name__, tuple(sig.items()),
                   tuple(sorted((k, str(x)) for k, x in const.items() if k not in shape)), warps, stages)
            specs.setdefault(key, (jit, sig, const, attrs, warps, stages))
    return list(specs.values())


def record(cases, dtypes):
    """Launches of forward + backward of every case in every (q/k/v dtype, gate dtype), kernels not run."""
    import torch
    from lctrain.kernels.gla_triton import triton_gla
    from lctrain.kernels.testing import case_inputs, record_launches
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    recs = []
    for case in cases.values():
        for name in dtypes:
            qkv, gd = (name.split("+") + [None])[:2]      # "bf16+fp32g": bf16 q/k/v, fp32 gates
            q, k, v, g, s0, cu = case_inputs(case, dtype=dt[qkv], g_dtype=dt[gd[:-1]] if gd else None)
            leaves = [t.requires_grad_(True) if t is not None else None for t in (q, k, v, g, s0)]
            with record_launches(run=False) as rec:
                o, fs = triton_gla(*leaves[:4], case["K"] ** -0.5, leaves[4], True, cu)
                (o.float().sum() + fs.sum()).backward()
            recs += rec
    return recs


def compile_one(spec, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    jit, sig, const, attrs, warps, stages = spec
    k = triton.compile(ASTSource(jit, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    assert k.asm.get("cubin"), "no cubin produced"
    return int(k.metadata.shared)


def describe(spec, with_config: bool = True) -> str:
    jit, sig, const, _, warps, stages = spec
    ptrs = ",".join(f"{n}:{t[1:]}" for n, t in sig.items() if t.startswith("*") and n in ("q", "k", "v", "g", "do"))
    cs = ",".join(f"{n}={v}" for n, v in const.items() if with_config or n not in ("BK", "BV"))
    return f"{jit.__name__}[{ptrs}] {cs}" + (f" warps={warps} stages={stages}" if with_config else "")


def selftest() -> int:
    """The checker must report a kernel that does not compile (and pass one that does)."""
    import triton
    import triton.language as tl

    @triton.jit
    def good(x, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        tl.store(x + r, tl.load(x + r) * 2)

    @triton.jit
    def broken(x, BLOCK: tl.constexpr):
        a = tl.load(x + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
        tl.store(x + tl.arange(0, BLOCK), tl.dot(a, a[:, :8]))   # inner dims mismatch

    ok = []
    for fn in (good, broken):
        try:
            compile_one((fn, {"x": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}, {}, 4, 2), 90)
            ok.append(True)
        except Exception as e:  # noqa: BLE001 - any compiler error counts
            print(f"selftest: {fn.__name__} failed to compile as expected: {str(e).splitlines()[0][:120]}")
            ok.append(False)
    print("selftest:", "ok" if ok == [True, False] else f"WRONG (good, broken compiled: {ok})")
    return 0 if ok == [True, False] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all dtypes, production shapes, every autotune config")
    ap.add_argument("--targets", type=int, nargs="*", default=list(TARGETS), help="compute capabilities")
    ap.add_argument("--cache-dir", default=None, help="TRITON_CACHE_DIR (default: a fresh temporary one)")
    ap.add_argument("--cases", nargs="*", help="--full: only the cases whose name contains one of these")
    ap.add_argument("--dtypes", nargs="*", choices=["fp32", "bf16", "fp16", "bf16+fp32g"],
                    help="--full: only these q/k/v dtypes (bf16+fp32g: fp32 gates)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--selftest", action="store_true", help="only check that a compiler error is reported")
    a = ap.parse_args(argv)
    tmp = None
    if a.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lctrain-aot-")
    os.environ["TRITON_CACHE_DIR"] = a.cache_dir or tmp.name
    if a.selftest:
        return selftest()

    import triton
    from lctrain.kernels.testing import PRODUCTION_CASES, TRITON_CASES
    t0 = time.time()
    if a.full:
        cases = {n: c for n, c in dict(TRITON_CASES, **PRODUCTION_CASES).items()
                 if not a.cases or any(p in n for p in a.cases)}
        dtypes = a.dtypes or ["fp32", "bf16", "fp16", "bf16+fp32g"]
        jobs = [(s, cc) for s in launch_specs(record(cases, dtypes), all_configs=True, by_code_path=False)
                for cc in a.targets]
    else:
        cases, dtypes = TRITON_CASES, ["fp32", "bf16"]
        jobs = [(s, cc) for s in launch_specs(record(cases, dtypes), all_configs=False, by_code_path=True)
                for cc in a.targets]
        prod = {n: PRODUCTION_CASES[n] for n in ("prod-head-128x128", "prod-key-128x128")}
        jobs += [(s, max(a.targets)) for s in launch_specs(record(prod, ["bf16"]), all_configs=True,
                                                             by_code_path=False)]
    print(f"triton {triton.__version__}: {len(jobs)} compiles ({len(cases)} cases x {len(dtypes)} dtypes, "
          f"sm_{', sm_'.join(map(str, a.targets))}; recorded in {time.time() - t0:.1f}s), {a.jobs} processes",
          flush=True)
    global JOBS
    JOBS = jobs
    if a.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.jobs) as pool:
            errors = pool.map(_compile_job, range(len(jobs)), chunksize=1)
    else:
        errors = [_compile_job(i) for i in range(len(jobs))]
    # a config over the shared-memory limit fails to launch; the autotuner skips it (OutOfResources),
    # so it is fatal only when no config of that launch fits
    fits = {}
    for (spec, cc), e in zip(jobs, errors):
        jit, sig, const = spec[:3]
        g = (describe(spec, with_config=False), cc, tuple(sig.items()),
             tuple((n, str(v)) for n, v in const.items() if n not in ("BK", "BV")))
        fits[g] = fits.get(g, False) or e is None
    failures = [m for e, m in (x for x in errors if x) if e == "error"]
    failures += [f"sm_{g[1]} {g[0]}: no autotune config fits in shared memory" for g, ok in fits.items() if not ok]
    for e, m in (x for x in errors if x):
        if e == "smem":
            print("note (autotune skips it):", m)
    for f in failures:
        print("FAIL", f)
    print(f"compiled {sum(1 for e in errors if not e or e[0] == 'smem')} kernels to cubins, "
          f"{sum(1 for e in errors if e and e[0] == 'smem')} configs over the shared-memory limit, "
          f"{len(failures)} failures, {time.time() - t0:.0f}s")
    return 1 if failures else 0


JOBS: list = []


def _compile_job(i: int):
    """None, or the failure line of compile job i (run in a forked worker)."""
    spec, cc = JOBS[i]
    try:
        shared = compile_one(spec, cc)
        if shared > SMEM_MAX.get(cc, 1 << 30):
            return ("smem", f"sm_{cc} {describe(spec)}: needs {shared} B of shared memory "
                            f"(limit {SMEM_MAX[cc]})")
        return None
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        lines = [ln for ln in str(e).splitlines() if ln.strip()][:3]
        return ("error", f"sm_{cc} {describe(spec)}: " + " | ".join(lines))


if __name__ == "__main__":
    sys.exit(main())
