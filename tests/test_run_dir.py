"""Run-directory ownership (issue 14, items 6, 7, 8, 9, 11, and 18's umask): a start that fails its
checks leaves the run directory byte-identical, fresh starts never mix runs, one trainer per run
directory, leftovers of killed saves/prunes/exports are cleaned, a full disk is named."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from lctrain.train import checkpoint as ckpt
from lctrain.train.trainer import TrainingError, train
from tests.foundation_utils import ROOT, read_metrics, run_cli, tiny_recipe
from tests.rundir_utils import (base, cache_dir, cli, copy_run, error_line, quiet, recipe_file,  # noqa: F401 (fixtures)
                                 snapshot, train_cli)




# --- 6. everything validated before the run directory is touched ---------------------------------------
MISMATCHES = {
    "d_model changed": (["--set", "model.d_model=32"], "model.d_model: 32 here, 64 when checkpoint"),
    "layers changed": (["--set", "model.n_layers=3"], "model.n_layers: 3 here, 2 when checkpoint"),
    "kv heads changed": (["--set", "model.mixers.attention.n_kv_heads=2"],
                         "model.mixers.attention.n_kv_heads: 2 here, 0 when checkpoint"),
    "seed changed": (["--set", "seed=1"], "seed: 1 here, 0 when checkpoint"),
    "seq_len changed": (["--set", "train.seq_len=32"], "train.seq_len=64, this run has 32"),
    "global batch changed": (["--set", "train.batch_size=2"], "global batch of 4 sequences, this run has 2"),
    "cosine extended": (["--set", "train.steps=8"], "train.steps: 4 -> 8 would change the cosine schedule"),
    "resume path missing": (["--resume", "/nonexistent/ckpt"], "no checkpoint found at /nonexistent/ckpt"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_failing_start_leaves_the_run_dir_untouched(base, tmp_path, case):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    args, expect = MISMATCHES[case]
    before = snapshot(run)
    line = error_line(train_cli(recipe, run, *args))
    assert expect in line, line
    assert snapshot(run) == before                     # recipe.yaml included: eval/export still work
    if case == "d_model changed":
        assert cli("export", run, "--out", str(tmp_path / "m.safetensors")).returncode == 0


# --- 7. fresh starts ----------------------------------------------------------------------------------
def test_resume_never_in_a_used_dir_is_refused(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    before = snapshot(run)
    line = error_line(train_cli(recipe, run, "--resume", "never"))
    assert "already holds a run (checkpoints up to step 4)" in line and "--fresh" in line
    assert snapshot(run) == before


def test_resume_from_another_run_into_a_used_dir_is_refused(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    other = copy_run(src, str(tmp_path / "other"))
    before = snapshot(run)
    line = error_line(train_cli(recipe, run, "--resume", ckpt.latest_checkpoint(other)))
    assert "would mix two runs" in line
    assert snapshot(run) == before


def test_fresh_moves_the_old_run_aside_and_starts_at_step_0(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    old = snapshot(run)
    res = train_cli(recipe, run, "--fresh", "--set", "train.steps=2")
    assert res.returncode == 0, res.stderr
    assert "moved to" in res.stdout
    (stamp,) = os.listdir(os.path.join(run, "superseded"))
    moved = snapshot(os.path.join(run, "superseded", stamp))
    assert moved == {k: v for k, v in old.items() if k != ".lock"}         # the whole old run, unchanged
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000002"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # the next plain run resumes the new run, not the old one
    res = train_cli(recipe, run, "--set", "train.steps=2")
    assert res.returncode == 0 and '"step": 2' in res.stdout, res.stderr


# --- 8. one trainer per run directory -----------------------------------------------------------------
HOLDER = """
import sys, time
from lctrain.train.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
lock.record_holder()
print("held", flush=True)
time.sleep(600)
"""


def test_second_trainer_is_refused_naming_the_holder_and_sigkill_releases(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        line = error_line(train_cli(recipe, run, "--set", "train.steps=4"))
        assert f"in use by another trainer (pid {holder.pid} on host {socket.gethostname()}" in line, line
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = train_cli(recipe, run)                     # the kernel dropped the lock with the process
    assert res.returncode == 0, res.stderr


def test_two_trainers_started_together_one_runs(cache_dir, tmp_path):
    recipe = recipe_file(tmp_path / "r.yaml", cache_dir, steps=30, every=10)
    run = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "lctrain.cli", "train", recipe, "--run-dir", run]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = outs[[p.returncode for p in procs].index(codes[1])][1]
    assert "in use by another trainer" in loser
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))


# --- 9. leftovers of killed saves, prunes, conversions and exports ------------------------------------
def test_leftovers_of_killed_saves_prunes_and_conversions_are_removed_on_start(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    root = ckpt.checkpoint_root(run)
    for name in ("step_00000006.tmp", ".deleting-step_00000002", ".universal-step_00000004-x1y2"):
        os.makedirs(os.path.join(root, name, "zero"))
        open(os.path.join(root, name, "zero", "f.pt"), "wb").write(b"x" * 1000)
    res = train_cli(recipe, run)
    assert res.returncode == 0, res.stderr
    assert "leftover" in res.stdout
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000004"]


def test_killed_prune_leaves_no_half_checkpoint(cache_dir, tmp_path, monkeypatch):
    """A prune killed after deleting some files of a checkpoint: that checkpoint is already out of
    sight (renamed first), so the next resume never picks a half-deleted one."""
    import shutil
    run = str(tmp_path / "run")
    real = shutil.rmtree

    def killed_midway(path, *a, **k):
        if os.path.basename(str(path)).startswith(".deleting-") and os.path.isdir(path):
            os.remove(os.path.join(path, "optim.pt"))
            raise KeyboardInterrupt("killed mid-prune")
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(cache_dir, steps=6, val_every=0, overrides=["checkpoint.every=2", "checkpoint.keep_last=1"]),
              run_dir=run, log=quiet)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000004"]
    out = train(tiny_recipe(cache_dir, steps=6, val_every=0, overrides=["checkpoint.every=2", "checkpoint.keep_last=1"]),
                run_dir=run, log=quiet)
    assert out["step"] == 6
    assert sorted(os.listdir(ckpt.checkpoint_root(run))) == ["step_00000006"]


def test_killed_export_leftover_is_removed_by_the_next_export(base, tmp_path):
    _, run = base
    out = tmp_path / "m.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.safetensors.tmp-{int(dead.stdout)}-abc123"
    stale.write_bytes(b"x" * 1000)
    res = cli("export", run, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# --- 11. a full disk --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["errno", "torch-zip-writer", "zero1-torch-zip-writer"])
def test_full_disk_names_the_cause_and_the_path_and_keeps_the_previous_checkpoint(cache_dir, tmp_path, monkeypatch, how):
    """ENOSPC while writing step 8's optimizer state, simulated two ways: an OSError(ENOSPC) from the
    writer, and torch's own zip writer on /dev/full (its 'unexpected pos' error) with a device
    reporting no space; the latter also inside DeepSpeed's ZeRO-1 save (its optimizer shard)."""
    run = str(tmp_path / "run")
    real_save = torch.save
    target = "optim_states.pt" if how.startswith("zero1") else "optim.pt"

    def full(obj, path, *a, **k):
        if str(path).endswith(target) and "step_00000008" in str(path):
            if how == "errno":
                with open("/dev/full", "wb") as f:
                    return real_save(obj, f)
            real_save(obj, "/dev/full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    if how != "errno":
        real_statvfs = os.statvfs

        class Full:
            def __init__(self, st):
                self.f_frsize, self.f_bavail = st.f_frsize, 0

        monkeypatch.setattr(os, "statvfs", lambda p: Full(real_statvfs(p)))
    zero = ["parallel.zero_stage=1", "train.device=cpu"] if how.startswith("zero1") else []
    with pytest.raises(TrainingError) as e:
        train(tiny_recipe(cache_dir, zero, steps=8, val_every=0), run_dir=run, log=quiet)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg
    assert "step_00000008.tmp" in msg and "step_00000004 is intact" in msg
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000004"]
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    assert not os.path.exists(os.path.join(ckpt.checkpoint_root(run), "step_00000008.tmp"))


def test_full_disk_one_line_from_the_cli(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    # sitecustomize on the path: every write of optim.pt fails with ENOSPC in the child process
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n_real = torch.save\n"
        "def _full(obj, path, *a, **k):\n"
        "    if str(path).endswith('optim.pt'):\n"
        "        f = open('/dev/full', 'wb')\n"
        "        return _real(obj, f)\n"
        "    return _real(obj, path, *a, **k)\n"
        "torch.save = _full\n")
    res = run_cli("train", recipe, "--run-dir", run, "--set", "optim.schedule=constant", "--set", "train.steps=6",
                  env={"PYTHONPATH": f"{site}:{ROOT}"})
    line = error_line(res)
    assert "no space left on device while saving checkpoint" in line and "step_00000004 is intact" in line, line
    assert ckpt.latest_checkpoint(run).endswith("step_00000004")


# --- 18 (umask part). exported files follow the umask -------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_export_follows_the_umask(base, tmp_path, umask, mode):
    from lctrain.train.export import export
    _, run = base
    old = os.umask(umask)
    try:
        export(run, str(tmp_path / "m.safetensors"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == mode


def test_torchrun_restart_continues_a_fresh_start(cache_dir, tmp_path, monkeypatch):
    """--fresh / --resume never apply to the first attempt; torchrun's restart of the group resumes it
    (it must neither move the new run aside nor be refused as a used directory)."""
    run = str(tmp_path / "run")
    real_save = torch.save

    def crash_at_8(obj, path, *a, **k):
        if "step_00000008" in str(path):
            raise OSError("killed (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_at_8)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_recipe(cache_dir, steps=8, val_every=0), run_dir=run, log=quiet, fresh=True)
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for kw in ({"fresh": True}, {"resume": "never"}):
        out = train(tiny_recipe(cache_dir, steps=8, val_every=0), run_dir=run, log=quiet, **kw)
        assert out["step"] == 8 and not os.path.exists(os.path.join(run, "superseded"))
    assert read_metrics(run)[4]["resumed_from"].endswith("step_00000004")
