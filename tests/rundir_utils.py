"""Helpers for the run-directory / trust / schedule tests: one small trained run shared per module,
copies of it to break, and a byte-level snapshot of a directory to prove a refused start touched nothing."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess

import pytest
import yaml

from tests.foundation_utils import run_cli, tiny_recipe_dict


def recipe_file(path, cache_dir: str, steps: int = 4, every: int = 2, keep_last: int = 3, optim=None, **train) -> str:
    d = tiny_recipe_dict(cache_dir, steps=steps, val_every=0, device="cpu", **train)
    d["checkpoint"] = {"every": every, "keep_last": keep_last}
    d["optim"].update(optim or {})
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


def snapshot(root: str) -> dict:
    """{relative path: sha256 (files) or 'dir'} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def error_line(res) -> str:
    """The single 'lctrain: error:' line of a failed CLI run (asserts there is exactly one and no traceback)."""
    assert res.returncode != 0, (res.stdout, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.startswith("lctrain: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`lctrain ARGS`: in this process through lctrain.cli.main (stdout/stderr captured; an uncaught
    exception propagates and fails the test), or as a subprocess when `env` is given."""
    if env is not None:
        return run_cli(*args, timeout=timeout, env=env)
    from lctrain.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def train_cli(recipe: str, run: str, *extra, timeout=300, env=None):
    return cli("train", recipe, "--run-dir", run, *extra, timeout=timeout, env=env)


def rehash(ckpt_dir: str):
    """Rewrite a checkpoint's manifest.json for its current files (what an attacker who edits a
    checkpoint can also do), computed here independently of lctrain's writer."""
    import json
    files = {}
    for rel, digest in snapshot(ckpt_dir).items():
        if digest != "dir" and rel != "manifest.json":
            files[rel] = {"bytes": os.path.getsize(os.path.join(ckpt_dir, rel)), "sha256": digest}
    with open(os.path.join(ckpt_dir, "manifest.json"), "w") as f:
        json.dump({"format": "lctrain-manifest/1", "hash": "sha256", "files": files}, f)


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="module")
def base(cache_dir, tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4) and its recipe file (one per test module)."""
    root = tmp_path_factory.mktemp("base")
    recipe = recipe_file(root / "r.yaml", cache_dir)
    run = str(root / "run")
    res = train_cli(recipe, run)
    assert res.returncode == 0, res.stderr
    return recipe, run
