"""Helpers for the ZeRO / launch / fault tests: a tiny recipe (the foundation tests' one, checkpoints
every 3 steps), a data cache shared by these modules, in-process workers, and the launcher run as a
subprocess with a hard timeout."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import torch
import yaml

from tests.foundation_utils import ROOT, tiny_recipe, tiny_recipe_dict

# CPU/gloo everywhere (also on a GPU machine). Tokenizer + token cache of the tiny recipe: deterministic and written atomically, so the ZeRO,
# launch and fault modules share one (building it is the slowest part of a tiny run).
CACHE = os.path.join(tempfile.gettempdir(), "lctrain-test-cache-zero")
STEPS = 6
EVERY = 3
TOL = dict(rtol=2e-5, atol=2e-5)          # fp32: different reduction orders, same math


def recipe_dict(**train) -> dict:
    d = tiny_recipe_dict(CACHE, **{"steps": STEPS, "val_every": 0, "device": "cpu", **train})
    d["checkpoint"] = {"every": EVERY, "keep_last": 3}
    return d


def recipe(overrides=(), **train):
    r = tiny_recipe(CACHE, overrides, **{"steps": STEPS, "val_every": 0, "device": "cpu", **train})
    r.checkpoint.every, r.checkpoint.keep_last = EVERY, 3
    return r


def write_recipe(path, **train) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(recipe_dict(**train), f)
    return str(path)


def quiet(msg):
    pass


def rows(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(run_dir: str) -> dict[int, dict]:
    return {r["step"]: r for r in rows(run_dir)}


def ckpt_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def model_state(run_dir: str, step: int) -> dict:
    return torch.load(os.path.join(ckpt_dir(run_dir, step), "model.pt"), weights_only=True)


def seed_run_from(src_run: str, step: int, dst_run: str):
    """A new run dir holding only `src_run`'s checkpoint of `step` (as if it had stopped there)."""
    os.makedirs(os.path.join(dst_run, "checkpoints"), exist_ok=True)
    shutil.copytree(ckpt_dir(src_run, step), ckpt_dir(dst_run, step))


def assert_losses_close(a: dict, b: dict, steps, what="", keys=("loss", "grad_norm")):
    """Per-step records equal within fp32 tolerance. (val_loss only between runs with the same
    batch_size x dp: that product sets how many validation sequences are scored.)"""
    for s in steps:
        for key in keys:
            if key == "val_loss" and not (key in a[s] and key in b[s]):
                continue
            x, y = a[s][key], b[s][key]
            assert abs(x - y) <= TOL["atol"] + TOL["rtol"] * abs(y), f"{what} step {s} {key}: {x} vs {y}"


def assert_models_close(a: dict, b: dict, what=""):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), f"{what} {k}: max diff " \
            f"{(a[k].float() - b[k].float()).abs().max().item()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "NPROC_PER_NODE", "MAX_RESTARTS", "LCTRAIN_FAULT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_launch(script: str, *args, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """`launch/<script> args...` with a hard timeout."""
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or launcher_env(), cwd=ROOT)


def train_worker(rank, world, run_dir, overrides, steps=STEPS, resume="auto"):
    """run_workers target: one training run; returns the result dict (rank 0 logs nothing)."""
    from lctrain.train.trainer import train
    return train(recipe(overrides, steps=steps), run_dir=run_dir, resume=resume, log=quiet)


def many(jobs) -> list:
    """Jobs for `train_many_worker`, each with its own rendezvous port: a process group re-created on
    the same port could meet the previous group's store (one rank still leaving it) and its addresses."""
    return [(run_dir, overrides, free_port()) for run_dir, overrides in jobs]


def train_many_worker(rank, world, jobs):
    """run_workers target: several runs in a row in the same processes [(run_dir, overrides, port), ...]."""
    from lctrain.train.trainer import train
    out = []
    for run_dir, overrides, port in jobs:
        os.environ["MASTER_PORT"] = str(port)
        out.append(train(recipe(overrides), run_dir=run_dir, log=quiet)["loss"])
    return out


__all__ = ["CACHE", "ROOT", "STEPS", "EVERY", "sys"]
