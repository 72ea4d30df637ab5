"""Atomic checkpoints in the run directory.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` that becomes visible only when complete:
everything is written into `step_XXXXXXXX.tmp/` and then renamed. A crash mid-save leaves a `.tmp`
directory that is ignored (and removed at the next save), never a broken `step_*` directory.
Files: `model.pt`, `optim.pt` (state dicts), `rng_rank{r}.pt` (torch RNG, per rank), `state.json`
(step, data position, token count, python/numpy RNG, and what wrote it). Loaded with weights_only.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    pass


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def list_checkpoints(run_dir: str) -> list[str]:
    """Completed checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, "state.json")))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: str, step: int) -> str:
    """A fresh temp directory for the checkpoint of `step` (stale ones from crashes are removed)."""
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    for n in os.listdir(root):
        if n.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    tmp = os.path.join(root, f"step_{step:08d}.tmp")
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, keep_last: int) -> str:
    """Make a staged checkpoint visible (atomic rename), then drop the oldest beyond keep_last."""
    final = tmp[: -len(".tmp")]
    if os.path.exists(final):          # re-saving the same step (e.g. end of run after a periodic save)
        shutil.rmtree(final)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    for old in list_checkpoints(os.path.dirname(os.path.dirname(final)))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def host_rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_host_rng_state(state: dict):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


def save_rng(tmp: str, rank: int):
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(tmp, f"rng_rank{rank}.pt"))


def load_rng(ckpt: str, rank: int):
    path = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt}: no RNG state for rank {rank} (saved with a different world size?)")
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_state(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, "state.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable state.json ({e})") from None


def write_state(tmp: str, state: dict):
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def load_tensor_file(ckpt: str, name: str, map_location="cpu"):
    path = os.path.join(ckpt, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt}: missing {name}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot load {name} ({str(e).splitlines()[0]})") from None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a run dir (its latest) or a checkpoint dir itself."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {path}")
    return latest
