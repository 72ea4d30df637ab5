"""What the checkpoint manifest (sha256 of every file) costs at save and at resume.

    python benchmarks/checkpoint_hash.py                   # 64 MB and 512 MB checkpoints
    python benchmarks/checkpoint_hash.py --sizes-mb 2048 --reps 3

A checkpoint of S MB is written as ZeRO-0 writes one: `model.pt` (S/3) and `optim.pt` (2S/3, the
two AdamW moments) with torch.save, into a staging directory that is fsynced and renamed
(`ckpt.publish`). Save: that, against the same plus `ckpt.write_manifest` (hash after write, files in
parallel threads). Load: `torch.load` of both files (weights_only), against `ckpt.check_checkpoint`
(verify hashes + weights-only vetting, memory-mapped) followed by the same loads. "Hashing alone" is
`write_manifest` on the written checkpoint (sha256 throughput, files in parallel). Interleaved
repetitions (alternating which goes first), medians, ratio = with / without. The page cache is warm (the files were just written),
as at save time; a resume on a cold cache reads the files twice from disk instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lctrain.train import checkpoint as ckpt  # noqa: E402


def _state(mb: float) -> tuple[dict, dict]:
    n = int(mb * 2 ** 20 / 4 / 3)                 # fp32 elements per third
    side = int(n ** 0.5)
    model = {f"w{i}": torch.randn(side // 4, side) for i in range(4)}
    optim = {"state": {i: {"exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}
                       for i, w in enumerate(model.values())}, "param_groups": [{"params": list(range(4))}]}
    return model, optim


def _save(run: str, step: int, model, optim, manifest: bool) -> float:
    t0 = time.perf_counter()
    tmp = ckpt.staging_dir(run, step)
    torch.save(model, os.path.join(tmp, "model.pt"))
    torch.save(optim, os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        f.write("{}")
    if manifest:
        ckpt.write_manifest(tmp)
    else:
        for n in os.listdir(tmp):
            ckpt._fsync_file(os.path.join(tmp, n))
    ckpt.publish(tmp, keep_last=1) if manifest else _publish_plain(tmp)
    return time.perf_counter() - t0


def _publish_plain(tmp: str):
    final = tmp[:-len(".tmp")]
    if os.path.exists(final):
        shutil.rmtree(final)
    ckpt._fsync_dir(tmp)
    os.replace(tmp, final)


def _load(path: str, check: bool) -> float:
    t0 = time.perf_counter()
    if check:
        ckpt.check_checkpoint(path)
    torch.load(os.path.join(path, "model.pt"), weights_only=True)
    torch.load(os.path.join(path, "optim.pt"), weights_only=True)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 512])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a private temp dir)")
    a = p.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="lctrain-bench-", dir=a.dir)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, dir {root}")
    print("| checkpoint | save | save + manifest | ratio | hashing alone | load | verify + vet + load | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for mb in a.sizes_mb:
            model, optim = _state(mb)
            plain_run, hashed_run = os.path.join(root, "plain"), os.path.join(root, "hashed")
            res = {"save": [], "save_m": [], "load": [], "load_c": [], "hash": []}
            for r in range(a.reps):
                order = [("save", plain_run, False), ("save_m", hashed_run, True)]
                for key, run, manifest in (order if r % 2 == 0 else order[::-1]):   # alternate who goes first
                    res[key].append(_save(run, 1, model, optim, manifest))
                res["load"].append(_load(os.path.join(plain_run, "checkpoints", "step_00000001"), False))
                res["load_c"].append(_load(os.path.join(hashed_run, "checkpoints", "step_00000001"), True))
                t0 = time.perf_counter()
                ckpt.write_manifest(os.path.join(hashed_run, "checkpoints", "step_00000001"))
                res["hash"].append(time.perf_counter() - t0)
            size = sum(os.path.getsize(os.path.join(hashed_run, "checkpoints", "step_00000001", f))
                       for f in ("model.pt", "optim.pt")) / 2 ** 20
            m = {k: statistics.median(v) for k, v in res.items()}
            print(f"| {size:,.0f} MB | {m['save']:.3f} s | {m['save_m']:.3f} s | {m['save_m'] / m['save']:.2f} "
                  f"| {m['hash']:.3f} s ({size / m['hash']:,.0f} MB/s) | {m['load']:.3f} s | {m['load_c']:.3f} s | {m['load_c'] / m['load']:.2f} |")
            shutil.rmtree(plain_run)
            shutil.rmtree(hashed_run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
