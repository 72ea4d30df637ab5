"""Whole-model training throughput: lctrain's architectures vs the library a user would pick instead.

    python benchmarks/models.py                          # every arch, T = 1K and 4K, eager + compiled
    python benchmarks/models.py --archs mamba2 transformer --T 1024 --no-compile
    python benchmarks/models.py --compile-archs mamba2 --no-memory   # compile one arch; no memory workers
    python benchmarks/models.py --profile --archs mamba2 --T 4096    # top ops per model
    python benchmarks/models.py --scaling                # chunk path time(64K) / (16 time(4K))
    python benchmarks/models.py --short                  # per-token cost at seq_len 16 vs 1024
    python benchmarks/models.py --out models.json        # also write every figure as JSON

One step = forward + cross-entropy over the logits + backward (gradients set to None before each),
batch 1, fp32, on one thread by default (`--threads`). Every model of a length is built in this one
process and timed in interleaved repetitions (model A, B, C, A, B, C, ...) after warm-up steps, so
a change of load hits all of them alike; the table prints medians and the ratio lctrain / peer from
the same repetitions. Peak memory is measured per (model, T) in a fresh worker process (resident-set
high-water mark above the model and inputs, reset through /proc/self/clear_refs), so it is that
model's own.

"compiled" is the same model after `LanguageModel.compile_blocks()` (what `train.compile: true` does:
inductor on each block, sequence ops eager); its first steps (compilation) are warm-up.

Peers (run on CPU, in their torch paths): transformers `Mamba2ForCausalLM` (without mamba_ssm /
causal_conv1d it runs its reference torch implementations), `LlamaForCausalLM` with `attn_implementation="sdpa"`; for BASED, a model
of the same shape whose Taylor linear-attention layers are fla's `BasedLinearAttention` run through
its torch `forward_reference` (fla's Triton ops do not run without a GPU). fla's GLA layer has no
torch path but the token-by-token `naive_recurrent_gla`, so GLA, Hydra and the hybrid print lctrain
only (eager vs compiled). Targets (issue 13) are printed next to the figures, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import rss  # benchmarks/rss.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

D_MODEL, N_LAYERS, VOCAB = 256, 4, 4096
ARCHS = ["mamba2", "gla", "based", "transformer", "hydra", "hybrid"]
TARGETS = {"mamba2": 1.5, "transformer": 1.2}      # lctrain / peer, tokens per second
SCALING_TARGET = 1.15                             # time(64K) / (16 time(4K)) of the chunk path
SHORT_TARGET = 1.5                                # per-token time at T=16 / at T=1024


# ---------------------------------------------------------------------------------------------
# models

def ours_config(arch: str):
    """The LMConfig of one row: d_model 256, 4 layers, vocab 4096."""
    from lctrain.models import build_config
    m2 = {"d_state": 64, "headdim": 32, "expand": 2, "ngroups": 1}
    raw = {
        "mamba2": {"arch": "mamba2", "mixers": {"mamba2": m2}},
        "gla": {"arch": "gla", "mixers": {"gla": {"n_heads": 4}}},
        # Taylor linear attention in every layer (the BASED layer fla ships), SwiGLU
        "based": {"arch": "based", "pattern": "B", "mixers": {"based": {"n_heads": 4, "feature_dim": 16}}},
        "transformer": {"arch": "transformer", "mixers": {"attention": {"n_heads": 4}}},
        "hydra": {"arch": "hydra", "pattern": "MMXR", "ffn_pattern": "EEPE",
                  "mixers": {"mamba2": m2,
                             "sparse_attention": {"n_heads": 4, "window": 256, "block_size": 64, "top_k": 4},
                             "workspace": {"n_slots": 32, "slot_dim": 256, "n_heads": 4, "chunk_size": 64}},
                  "ffns": {"moe": {"n_experts": 4, "top_k": 2, "hidden": 384, "routing": "chunk", "chunk_size": 64},
                           "pkm": {"n_heads": 2, "n_sub_keys": 64, "key_dim": 64, "top_k": 4}}},
        "hybrid": {"arch": "mamba2", "pattern": "MMMA", "ffn_pattern": "-E",
                   "mixers": {"mamba2": m2, "attention": {"n_heads": 4}},
                   "ffns": {"moe": {"n_experts": 4, "top_k": 2, "hidden": 512, "routing": "token"}}},
    }[arch]
    raw = dict(raw, d_model=D_MODEL, n_layers=N_LAYERS, vocab_size=VOCAB)
    return build_config(raw)


def build_ours(arch: str, compiled: bool = False):
    import torch
    from lctrain.models import build_model
    torch.manual_seed(0)
    model = build_model(ours_config(arch))
    if compiled:
        model.compile_blocks()
    return model


def build_peer(arch: str):
    """(name, model) of the peer a user would pick on CPU, or None where none runs."""
    import torch
    torch.manual_seed(0)
    if arch == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM
        cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, state_size=64,
                           head_dim=32, expand=2, n_groups=1, num_heads=2 * D_MODEL // 32, conv_kernel=4,
                           tie_word_embeddings=True, use_cache=False)
        return "transformers Mamba2ForCausalLM (torch path)", Mamba2ForCausalLM(cfg)
    if arch == "transformer":
        from transformers import LlamaConfig, LlamaForCausalLM
        from lctrain.models.layers import swiglu_hidden
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=swiglu_hidden(D_MODEL),
                          num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=1 << 17, tie_word_embeddings=True, use_cache=False,
                          attn_implementation="sdpa")
        return "transformers LlamaForCausalLM (sdpa)", LlamaForCausalLM(cfg)
    if arch == "based":
        return "same model, Taylor layers = fla BasedLinearAttention.forward_reference", _fla_based_model()
    return None


def _fla_based_model():
    """Our BASED row's model with every mixer replaced by fla's BASED layer (its torch path)."""
    import torch
    from fla.layers import BasedLinearAttention

    class FlaMixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = BasedLinearAttention(hidden_size=D_MODEL, feature_dim=16, num_heads=4,
                                              num_key_value_heads=4)

        def forward(self, x, ctx, cache=None):
            return self.layer.forward_reference(x)

    model = build_ours("based")
    for block in model.layers:
        block.mixer = FlaMixer()
    return model


def make_step(model, T: int, batch: int = 1):
    """One training step (forward, cross-entropy, backward) on fixed random tokens [batch, T]."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    model.train()
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        logits = model(x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        return loss
    return step


# ---------------------------------------------------------------------------------------------
# peak memory: one fresh worker per (model, T)



def mem_worker(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    model = build_peer(a.arch)[1] if a.which == "peer" else build_ours(a.arch, a.which == "compiled")
    step = make_step(model, a.T[0])
    step()                                   # first-call allocations (and compilation) are not the step's
    import gc
    gc.collect()
    base = rss.reset_peak()
    step()
    return {"peak_mem_mb": (rss.peak() - base) / 2 ** 20}


def measure_memory(arch: str, which: str, T: int, threads: int):
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-worker", "--archs", arch, "--which", which,
           "--T", str(T), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 16),
               MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mem_mb"]


# ---------------------------------------------------------------------------------------------
# timing

def time_interleaved(steps: dict, reps: int, warmup: int) -> dict:
    """Median seconds of each step, timed in interleaved rounds."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "times_s": v} for k, v in times.items()}


def run_table(a) -> list[dict]:
    """One row per (arch, T): lctrain eager / compiled and the peer, timed together per T."""
    rows = []
    for T in a.T:
        steps, names = {}, {}
        for arch in a.archs:
            steps[(arch, "eager")] = make_step(build_ours(arch), T)
            if a.compile and arch in (a.compile_archs or a.archs):
                steps[(arch, "compiled")] = make_step(build_ours(arch, compiled=True), T)
            peer = None if a.no_peers else build_peer(arch)
            if peer is not None:
                names[arch] = peer[0]
                steps[(arch, "peer")] = make_step(peer[1], T)
        t0 = time.perf_counter()
        res = time_interleaved(steps, a.reps, a.warmup)
        print(f"[T={T}: {len(steps)} models timed in {time.perf_counter() - t0:.0f} s, "
              f"load average {os.getloadavg()[0]:.1f}]", flush=True)
        for arch in a.archs:
            row = {"arch": arch, "T": T, "peer_name": names.get(arch)}
            for which in ("eager", "compiled", "peer"):
                if (arch, which) in res:
                    s = res[(arch, which)]["median_s"]
                    row[which] = {"median_s": s, "tok_s": T / s, "times_s": res[(arch, which)]["times_s"]}
                    if a.memory:
                        row[which]["peak_mem_mb"] = measure_memory(arch, which, T, a.threads)
            if "peer" in row:
                best = min(row[w]["median_s"] for w in ("eager", "compiled") if w in row)
                row["ratio"] = row["peer"]["median_s"] / best
                row["ratio_eager"] = row["peer"]["median_s"] / row["eager"]["median_s"]
                row["target"] = TARGETS.get(arch)
            rows.append(row)
        del steps
    return rows


def print_table(rows):
    f = lambda x, k, fmt: "-" if not x or x.get(k) is None else format(x[k], fmt)
    print("\n| model | T | lctrain eager tok/s | compiled tok/s | peer | peer tok/s | lctrain / peer "
          "(eager, best) | target | peak MB eager / compiled / peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c, p = r.get("eager"), r.get("compiled"), r.get("peer")
        ratio = "-" if "ratio" not in r else f"{r['ratio_eager']:.2f}, {r['ratio']:.2f}"
        tgt = r.get("target")
        verdict = "-" if not tgt else f">= {tgt} " + ("met" if r["ratio"] >= tgt else "MISSED")
        mem = " / ".join(f(x, "peak_mem_mb", ".0f") for x in (e, c, p))
        print(f"| {r['arch']} | {r['T']} | {f(e, 'tok_s', '.0f')} | {f(c, 'tok_s', '.0f')} | "
              f"{r['peer_name'] or '-'} | {f(p, 'tok_s', '.0f')} | {ratio} | {verdict} | {mem} |")


# ---------------------------------------------------------------------------------------------
# --profile: where the time goes

def run_profile(a):
    from torch.profiler import ProfilerActivity, profile
    for T in a.T:
        for arch in a.archs:
            variants = [("lctrain", build_ours(arch))]
            peer = None if a.no_peers else build_peer(arch)
            if peer is not None:
                variants.append((peer[0], peer[1]))
            for name, model in variants:
                step = make_step(model, T)
                step()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step()
                print(f"\n== {arch} T={T}: {name} ==")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


# ---------------------------------------------------------------------------------------------
# --scaling: the chunk path's cost per token from 4K to 64K; --short: seq_len 16 vs 1024

def run_scaling(a) -> dict:
    """fwd+bwd of the chunk primitive (H=4, K=V=64, per-head and per-key gates) at 4K and 64K."""
    import torch
    from lctrain import kernels
    from lctrain.kernels.testing import gla_inputs
    out = {}
    for gate in ("head", "key"):
        steps = {}
        for T in (4096, 65536):
            q, k, v, g, _ = gla_inputs(1, T, 4, 64, 64, gate, dtype=torch.float32)
            leaves = [t.requires_grad_(True) for t in (q, k, v, g)]
            do = torch.randn(1, T, 4, 64)

            def step(leaves=leaves, do=do):
                for t in leaves:
                    t.grad = None
                o, _ = kernels.gated_linear_attention(*leaves, backend="chunk")
                torch.autograd.backward(o, do)
            steps[T] = step
        res = time_interleaved(steps, max(3, a.reps // 2), 1)
        ratio = res[65536]["median_s"] / (16 * res[4096]["median_s"])
        out[gate] = {"t4k_s": res[4096]["median_s"], "t64k_s": res[65536]["median_s"], "ratio": ratio}
        print(f"chunk path, {gate} gates: 4K {res[4096]['median_s'] * 1e3:.0f} ms, 64K "
              f"{res[65536]['median_s'] * 1e3:.0f} ms; time(64K) / (16 time(4K)) = {ratio:.2f} "
              f"(target <= {SCALING_TARGET}: {'met' if ratio <= SCALING_TARGET else 'MISSED'})", flush=True)
    return out


def run_short(a) -> dict:
    """Per-token training cost at seq_len 16 (batch 64) vs seq_len 1024 (batch 1), same model."""
    out = {}
    for arch in a.archs:
        model = build_ours(arch)
        steps = {16: make_step(model, 16, batch=64), 1024: make_step(model, 1024, batch=1)}
        res = time_interleaved(steps, a.reps, a.warmup)
        ratio = res[16]["median_s"] / res[1024]["median_s"]      # same tokens per step (1024)
        out[arch] = {"t16_s": res[16]["median_s"], "t1024_s": res[1024]["median_s"], "ratio": ratio}
        print(f"{arch}: 64 x 16 tokens {res[16]['median_s'] * 1e3:.0f} ms, 1 x 1024 tokens "
              f"{res[1024]['median_s'] * 1e3:.0f} ms; per-token cost ratio {ratio:.2f} "
              f"(target <= {SHORT_TARGET}: {'met' if ratio <= SHORT_TARGET else 'MISSED'})", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--T", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variant")
    ap.add_argument("--compile-archs", nargs="+", choices=ARCHS, help="compile only these (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory workers")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step per model")
    ap.add_argument("--top", type=int, default=15, help="ops per profile")
    ap.add_argument("--scaling", action="store_true", help="only the chunk path's 4K -> 64K scaling")
    ap.add_argument("--short", action="store_true", help="only the seq_len 16 vs 1024 per-token cost")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--mem-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="eager", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    torch.set_num_threads(a.threads)
    if a.mem_worker:
        a.arch = a.archs[0]
        print(json.dumps(mem_worker(a)))
        return
    info = {"threads": a.threads, "torch": torch.__version__, "load_average_start": os.getloadavg()}
    print(f"one process, {a.threads} thread(s), torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)", flush=True)
    if a.profile:
        run_profile(a)
        return
    if a.scaling:
        result = {"scaling": run_scaling(a)}
    elif a.short:
        result = {"short": run_short(a)}
    else:
        rows = run_table(a)
        print_table(rows)
        result = {"rows": rows}
    info["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(info, **result), fh, indent=1)


if __name__ == "__main__":
    main()
