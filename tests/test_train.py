"""The training loop: loss falls, metrics are well-formed, resume is exact, saves are atomic,
non-finite losses are skipped then stop the run, SIGTERM saves and exits with status 143."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lctrain.train import checkpoint as ckpt
from lctrain.train import trainer as trainer_mod
from lctrain.train.trainer import TrainingError, train
from tests.foundation_utils import ROOT, read_metrics, tiny_recipe, tiny_recipe_dict

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def quiet(msg):
    pass


def test_loss_falls_and_metrics_are_well_formed(cache_dir, tmp_path):
    run = str(tmp_path / "run")
    out = train(tiny_recipe(cache_dir, steps=40, val_every=20), run_dir=run, log=quiet)
    assert out["status"] == "completed" and out["step"] == 40
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:
        assert REQUIRED <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 64
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert rows[-1]["val_loss"] < rows[0]["loss"]
    assert os.path.isfile(os.path.join(run, "recipe.yaml")) and os.path.isfile(os.path.join(run, "tokenizer.model"))
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000032", "step_00000036", "step_00000040"]


def test_resume_is_exact(cache_dir, tmp_path):
    """2N steps straight == N steps, then a fresh trainer resuming from the step-N checkpoint, N steps."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(tiny_recipe(cache_dir, steps=8), run_dir=straight, log=quiet)
    # first half: a run interrupted after step 4 (its checkpoint), then resumed by a new Trainer
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(straight, "checkpoints", "step_00000004"),
                    os.path.join(resumed, "checkpoints", "step_00000004"))
    out = train(tiny_recipe(cache_dir, steps=8), run_dir=resumed, log=quiet)
    assert out["step"] == 8
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(b) == [5, 6, 7, 8]
    for s in b:
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] and a[s]["tokens"] == b[s]["tokens"]
    sa = torch.load(os.path.join(straight, "checkpoints", "step_00000008", "model.pt"), weights_only=True)
    sb = torch.load(os.path.join(resumed, "checkpoints", "step_00000008", "model.pt"), weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ckpt.read_state(os.path.join(resumed, "checkpoints", "step_00000008"))["consumed"] == 8 * 4


def test_interrupted_save_keeps_last_good_checkpoint(cache_dir, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, path, *a, **k):
        if str(path).endswith("optim.pt") and "step_00000008" in str(path):
            calls["n"] += 1
            with open(path, "wb") as f:          # half a file, then the crash
                f.write(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_recipe(cache_dir, steps=8), run_dir=run, log=quiet)
    assert calls["n"] == 1
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_00000004")
    monkeypatch.setattr(torch, "save", real_save)
    out = train(tiny_recipe(cache_dir, steps=8), run_dir=run, log=quiet)   # resumes from step 4, finishes
    assert out["step"] == 8 and ckpt.latest_checkpoint(run).endswith("step_00000008")
    assert not [n for n in os.listdir(ckpt.checkpoint_root(run)) if n.endswith(".tmp")]


def test_nonfinite_loss_is_skipped_then_stops(cache_dir, tmp_path, monkeypatch):
    real = trainer_mod.token_loss_sum
    calls = {"n": 0}

    def sometimes_nan(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] in (3,) or calls["n"] >= 6 else loss

    monkeypatch.setattr(trainer_mod, "token_loss_sum", sometimes_nan)
    run = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(tiny_recipe(cache_dir, steps=20, val_every=0, max_nonfinite_steps=3), run_dir=run, log=quiet)
    rows = read_metrics(run)
    assert rows[2]["skipped_steps"] == 1 and rows[3]["skipped_steps"] == 1   # step 3 skipped, then recovered
    assert ckpt.latest_checkpoint(run).endswith("step_00000004")           # nothing saved after the failure


def test_sigterm_saves_and_exits_143(cache_dir, tmp_path):
    import yaml
    run = tmp_path / "run"
    d = tiny_recipe_dict(cache_dir, steps=100000, val_every=0)
    d["checkpoint"] = {"every": 0, "keep_last": 2}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "lctrain.cli", "train", str(recipe), "--run-dir", str(run)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err       # saved, then the conventional "stopped by SIGTERM"
    assert '"status": "interrupted"' in out
    last = ckpt.latest_checkpoint(str(run))
    assert last is not None
    assert ckpt.read_state(last)["step"] == read_metrics(str(run))[-1]["step"]
