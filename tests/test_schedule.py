"""Learning-rate schedules (issue 14, item 19): warmup-stable-decay, and what a new train.steps does
on resume: allowed when the LR at the resume step is unchanged (wsd in its stable phase: the decay
moves to the new end), refused with one line otherwise (cosine / linear, or wsd already decaying)."""
import math
import os

import pytest

from lctrain.config import OptimConfig
from lctrain.schema import ConfigError
from lctrain.train import checkpoint as ckpt
from lctrain.train.optim import lr_at, steps_change_problem, wsd_decay_start
from lctrain.train.trainer import train
from tests.foundation_utils import read_metrics, tiny_recipe


def quiet(msg):
    pass


def test_wsd_shape():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)            # linear warmup
    assert all(x == 1e-3 for x in lrs[10:80])                                         # stable
    assert wsd_decay_start(100, cfg) == 80                                            # the last 20 steps decay
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))                             # strictly decaying
    assert lrs[80] == pytest.approx(1e-3 * (0.1 + 0.9 * (1 - 1 / 20)))
    assert lrs[99] == pytest.approx(1e-4) and lr_at(100, 100, cfg) == pytest.approx(1e-4)   # the floor
    sqrt = OptimConfig(lr=1e-3, warmup_steps=0, schedule="wsd", decay_steps=16, decay_shape="1-sqrt", min_lr_ratio=0.0)
    assert wsd_decay_start(100, sqrt) == 84
    assert lr_at(88, 100, sqrt) == pytest.approx(1e-3 * (1 - math.sqrt(5 / 16)))


@pytest.mark.parametrize("schedule,step,old,new,allowed", [
    ("wsd", 50, 100, 200, True),        # stable phase: extension keeps the LR, the decay moves
    ("wsd", 79, 100, 60, False),        # shortening past the step: now decaying
    ("wsd", 90, 100, 200, False),       # already decaying: the LR would jump back up
    ("wsd", 80, 100, 200, True),        # exactly where the decay starts: the branch point
    ("cosine", 300, 300, 400, False),   # the example: 2e-4 -> 5.1e-4 silently before
    ("cosine", 150, 300, 400, False),
    ("linear", 150, 300, 200, False),
    ("cosine", 5, 300, 400, True),      # still warming up: unchanged
    ("constant", 150, 300, 400, True),
])
def test_steps_change_on_resume(schedule, step, old, new, allowed):
    cfg = OptimConfig(lr=6e-4, warmup_steps=10, schedule=schedule)
    ok, line = steps_change_problem(step, old, new, cfg)
    assert ok == allowed and "\n" not in line
    if not ok:
        assert f"{old} -> {new} would change the {schedule} schedule" in line and "trained with lr" in line
        if new > old and step >= old - 1:
            assert "would rise from" in line and f"at step {step} to" in line        # extending a decayed run
        assert ("at or before step" in line) if schedule == "wsd" else ("optim.schedule: wsd" in line)


def test_wsd_decay_must_fit():
    with pytest.raises(ConfigError, match="optim.decay_steps"):
        tiny_recipe("/tmp/unused", ["optim.schedule=wsd", "optim.decay_steps=8", "optim.warmup_steps=2"], steps=8)


WSD = ["optim.schedule=wsd", "optim.decay_steps=2", "optim.warmup_steps=2", "checkpoint.every=4",
       "checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def test_extending_a_wsd_run_equals_training_longer_from_the_start(cache_dir, tmp_path):
    """8 steps of wsd (decay over steps 7-8) keep the step-6 checkpoint where the decay starts;
    resuming it with train.steps=12 gives bitwise the losses and LRs of 12 steps straight."""
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    train(tiny_recipe(cache_dir, WSD, steps=8, val_every=0), run_dir=run, log=quiet)
    # keep_last=1 pruned step 4, never the decay-start checkpoint
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000006", "step_00000008"]
    assert ckpt.read_state(ckpt.list_checkpoints(run)[0])["keep"] is True
    # a finished (decayed) wsd run cannot simply be extended: one line, pointing at step 6
    with pytest.raises(ConfigError, match=r"train.steps: 8 -> 12 would change the wsd schedule .* at or before step 6"):
        train(tiny_recipe(cache_dir, WSD, steps=12, val_every=0), run_dir=run, log=quiet)
    logs = []
    out = train(tiny_recipe(cache_dir, WSD, steps=12, val_every=0), run_dir=run, log=logs.append,
                resume=ckpt.list_checkpoints(run)[0])
    assert out["step"] == 12
    assert any("train.steps 8 -> 12: the wsd schedule keeps lr" in m and "steps 11..12" in m for m in logs), logs
    train(tiny_recipe(cache_dir, WSD, steps=12, val_every=0), run_dir=straight, log=quiet)
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(run)}
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["lr"] == b[s]["lr"], s
    assert [b[s]["lr"] for s in (6, 7, 10)] == [3e-3] * 3 and b[12]["lr"] < b[11]["lr"] < 3e-3
    assert b[12]["lr"] == pytest.approx(3e-4)                                        # min_lr_ratio 0.1
    # the abandoned branch (old steps 7-8) was set aside, not mixed in
    assert os.listdir(os.path.join(run, "superseded"))
