"""Small recipes and runners shared by the foundation tests (tiny models, a slice of the built-in corpus)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lctrain.config import recipe_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_recipe_dict(cache_dir: str, **train) -> dict:
    return {
        "name": "tiny", "seed": 0,
        "model": {"arch": "transformer", "d_model": 64, "n_layers": 2, "mixers": {"attention": {"n_heads": 4}}},
        "tokenizer": {"vocab_size": 512, "train_bytes": 400_000},
        "data": {"source": "builtin", "max_bytes": 600_000, "cache_dir": cache_dir, "val_fraction": 0.2},
        "train": {"steps": 8, "batch_size": 4, "seq_len": 64, "log_every": 1, "val_every": 4, "val_batches": 2,
                  "num_threads": 1, **train},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"every": 4, "keep_last": 3},
        "logging": {"wandb": "disabled", "progress": "off"},
    }


def tiny_recipe(cache_dir: str, overrides=(), **train):
    return recipe_from_dict(tiny_recipe_dict(cache_dir, **train), list(overrides))


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lctrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=ROOT)
