"""Inference cost of the state-collapse knobs vs the unmitigated pass, on the state-collapse study's model
shape (Mamba-2, 4 layers, d_model 128, d_state 128, headdim 32; random weights with slow-forgetting dt, or a
trained run with --run): one long stream in chunks, as `lctrain eval length` runs it.

    python benchmarks/state_norm.py                      # T = 8192, batch 1, 5 interleaved repetitions
    python benchmarks/state_norm.py --run runs/studies/state-collapse/runs/slow64 --T 16384

Rows: `none`; `state_norm` (the chunked exact cap, lctrain/models/recurrent.py `_capped`) with a cap that
binds on every head; `state_window` and `decay_scale` for reference; and `state_norm reference` (the
token-by-token definition, `_capped_reference`, timed once on a shorter stream and scaled, since it is
what the chunked path replaced). Repetitions are interleaved (every knob once per round); the table gives
median tokens/s and the ratio of time to `none`. The issue's target: state_norm within 2x of none.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _model(args):
    if args.run:
        from lctrain.eval.loading import load_run
        return load_run(args.run).model
    from lctrain.config import recipe_from_dict
    from lctrain.models import build_model
    cfg = recipe_from_dict({"model": {"arch": "mamba2", "d_model": 128, "n_layers": 4, "vocab_size": 4096,
                                      "mixers": {"mamba2": {"d_state": 128, "headdim": 32, "dt_min": 1e-4,
                                                            "dt_max": 1e-2}}}}).model
    torch.manual_seed(0)
    return build_model(cfg).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run directory (default: random weights)")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lctrain.eval.inference import stream
    from lctrain.models import InferenceKnobs
    import lctrain.models.recurrent as rec
    model = _model(a)
    V = model.embed.weight.shape[0]
    ids = torch.randint(0, V, (a.batch, a.T), generator=torch.Generator().manual_seed(0))
    knobs = {"none": InferenceKnobs(), "state_norm": InferenceKnobs(state_norm=1e-3),
             "state_window": InferenceKnobs(state_window=64), "decay_scale": InferenceKnobs(decay_scale=4.0)}
    times = {k: [] for k in knobs}
    for _ in range(a.reps):
        for name, kn in knobs.items():
            t = time.perf_counter()
            stream(model, ids, chunk_size=a.chunk, knobs=kn)
            times[name].append(time.perf_counter() - t)
    # the token-by-token definition on a shorter stream (it is O(T) Python steps per layer)
    short = min(a.T, 1024)
    fast = rec._capped
    rec._capped = lambda q, k, v, g, scale, state, cap: rec._capped_reference(q, k, v, g, scale, state, cap)
    t = time.perf_counter()
    stream(model, ids[:, :short], chunk_size=a.chunk, knobs=knobs["state_norm"])
    ref = (time.perf_counter() - t) * a.T / short
    rec._capped = fast
    tok = a.batch * a.T
    base = statistics.median(times["none"])
    load = os.getloadavg()
    print(f"T={a.T} batch={a.batch} chunk={a.chunk} threads={a.threads} reps={a.reps} "
          f"{'run ' + a.run if a.run else 'random weights'}; load average {load[0]:.1f} (a shared machine: ratios "
          f"matter, absolute times do not)")
    print(f"| pass | median s | tokens/s | time / none |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {tok / m:,.0f} | {m / base:.2f} |")
    print(f"| state_norm reference (token by token, {short} tokens, scaled) | {ref:.2f} | {tok / ref:,.0f} | {ref / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
