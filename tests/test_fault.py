"""Fault tolerance under torchrun: a SIGKILLed worker under --max-restarts 1 -> the group restarts,
resumes from the last checkpoint and finishes exactly like an uninterrupted run from that checkpoint,
with no batch skipped or seen twice; a hung rank is stopped by parallel.timeout_s with a clear error."""
import os

import pytest
import torch

from lctrain.train import checkpoint as ckpt
from tests.dist_utils import run_workers
from tests.zero_utils import (STEPS, by_step, ckpt_dir, launcher_env, model_state, rows, run_launch, seed_run_from,
                              train_worker, write_recipe)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

ZERO2 = ["parallel.zero_stage=2", "train.batch_size=2"]     # 2 ranks x 2 = global batch 4


def test_sigkill_restart_resumes_and_loses_nothing(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    run = str(tmp_path / "run")
    # rank 1 SIGKILLs itself during step 5 of the first attempt; checkpoints are at steps 3 and 6
    res = run_launch("single_node.sh", recipe_path, "--nproc-per-node", 2, "--max-restarts", 1, "--run-dir", run,
                     *[a for o in ZERO2 for a in ("--set", o)], env=launcher_env(LCTRAIN_FAULT="kill:5:1"), timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert '"status": "completed"' in res.stdout
    assert "collective failed at step 5: lost the connection to another rank" in res.stderr   # the survivor's view

    got = by_step(run)
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))      # each step once in the lineage
    assert got[4]["restart"] == 1 and got[4]["resumed_from"] == ckpt_dir(run, 3)
    assert got[4]["rolled_back_steps"] == [4]                               # done before the kill, redone after
    assert all("restart" not in got[s] for s in (1, 2, 3, 5, 6))
    # token accounting: every step consumed the next 4 sequences of the global order, none twice
    for s in range(1, STEPS + 1):
        assert got[s]["data_start"] == (got[s - 1]["consumed"] if s > 1 else 0)
        assert got[s]["consumed"] - got[s]["data_start"] == 4 and got[s]["tokens"] == got[s]["consumed"] * 64
    final = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert final["step"] == STEPS and final["consumed"] == 4 * STEPS and final["skipped_steps"] == 0
    lost = rows(run, "metrics.rolled_back.jsonl")
    assert [r["step"] for r in lost] == [4] and lost[0]["data_start"] == got[4]["data_start"]
    assert lost[0]["loss"] == got[4]["loss"]                                 # same data, same state

    # an uninterrupted run from the same checkpoint: the same trajectory and the same final model
    ref = str(tmp_path / "ref")
    seed_run_from(run, 3, ref)
    run_workers(train_worker, 2, ref, ZERO2, timeout=240)
    want = by_step(ref)
    assert all(got[s]["loss"] == want[s]["loss"] and got[s]["grad_norm"] == want[s]["grad_norm"] for s in (4, 5, 6))
    a, b = model_state(run, STEPS), model_state(ref, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hung_rank_is_stopped_by_the_collective_timeout(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    run = str(tmp_path / "run")
    # rank 1 stops answering collectives during step 2 (for 10 minutes); the run must not wait for it
    res = run_launch("single_node.sh", recipe_path, "--nproc-per-node", 2, "--run-dir", run,
                     "--set", "parallel.timeout_s=3", "--set", "train.batch_size=2",
                     env=launcher_env(LCTRAIN_FAULT="hang:2:1:600"), timeout=200)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("lctrain: error: collective timed out at step 2")]
    assert errors and "within parallel.timeout_s=3s" in errors[0], res.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == [1]
    assert ckpt.latest_checkpoint(run) is None
    assert not os.path.isdir(ckpt.checkpoint_root(run)) or not os.listdir(ckpt.checkpoint_root(run))
