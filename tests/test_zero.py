"""ZeRO through DeepSpeed on CPU/gloo: every stage (and DP x SP) trains like one process; non-finite
losses are skipped under ZeRO; checkpoints resume across stages and world sizes (or refuse with the
documented message); `lctrain export` consolidates ZeRO shards into one loadable file."""
import os

import pytest
import torch

from lctrain.train import checkpoint as ckpt
from lctrain.train.trainer import TrainingError, train
from tests.dist_utils import run_workers
from tests.foundation_utils import run_cli
from tests.zero_utils import (STEPS, assert_losses_close, assert_models_close, by_step, ckpt_dir, model_state,
                              many, quiet, recipe, rows, seed_run_from, train_many_worker, train_worker)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (ZeRO-0, batch 4), and DP=2 (batch 2 per rank, same global batch) with ZeRO 0, 1, 2, 3,
    6 steps each with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("zero-runs")
    out = {"single": str(root / "single")}
    train(recipe(), run_dir=out["single"], log=quiet)
    jobs = []
    for stage in (0, 1, 2, 3):
        out[stage] = str(root / f"zero{stage}")
        jobs.append((out[stage], [f"parallel.zero_stage={stage}", "train.batch_size=2"]))
    run_workers(train_many_worker, 2, many(jobs), timeout=300)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_dp2_matches_single_process(runs, stage):
    single, z = by_step(runs["single"]), by_step(runs[stage])
    assert sorted(z) == list(range(1, STEPS + 1))
    assert_losses_close(z, single, range(1, STEPS + 1), f"zero{stage}", keys=("loss", "grad_norm", "val_loss"))
    assert "val_loss" in z[STEPS]                                      # validation (ZeRO-3: gathered weights) too
    assert single[STEPS]["loss"] < single[1]["loss"]
    assert [z[s]["consumed"] for s in z] == [4 * s for s in z]
    assert_models_close(model_state(runs[stage], STEPS), model_state(runs["single"], STEPS), f"zero{stage}")
    st = ckpt.read_state(ckpt_dir(runs[stage], STEPS))
    assert st["zero_stage"] == stage and st["world_size"] == 2 and st["format"] == ("deepspeed" if stage else "torch")
    names = set(os.listdir(ckpt_dir(runs[stage], STEPS)))
    if stage:   # DeepSpeed's shards: one optimizer shard per rank (+ one parameter shard per rank for stage 3)
        shards = set(os.listdir(os.path.join(ckpt_dir(runs[stage], STEPS), "zero")))
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards
        assert ({f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= shards) == (stage == 3)
    else:
        assert {"model.pt", "optim.pt"} <= names
    assert not [n for n in os.listdir(os.path.join(runs[stage], "checkpoints")) if n.endswith(".tmp")]


def test_zero_dp2_sp2_matches_single_process(runs, tmp_path):
    """4 ranks = DP 2 x SP 2 (Ulysses attention), ZeRO-3 sharded over all four."""
    run = str(tmp_path / "dp2sp2")
    run_workers(train_worker, 4, run, ["parallel.zero_stage=3", "parallel.sp=2", "train.batch_size=2"], 3, "never",
                timeout=300)
    assert_losses_close(by_step(run), by_step(runs["single"]), range(1, 4), "dp2 x sp2 zero3")
    assert ckpt.read_state(ckpt_dir(run, 3))["sp_size"] == 2


def _nonfinite_worker(rank, world, run_dir, overrides, bad_calls, kind, steps):
    from lctrain.train import trainer as trainer_mod
    real = trainer_mod.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        if rank == 0 and calls["n"] in bad_calls:
            return loss + float("inf") if kind == "inf" else loss * float("nan")
        return loss

    trainer_mod.token_loss_sum = poisoned
    try:
        out = train(recipe(overrides, steps=steps, max_nonfinite_steps=2), run_dir=run_dir, log=quiet)
        return out["step"]
    except TrainingError as e:
        return str(e)
    finally:
        trainer_mod.token_loss_sum = real


def test_nonfinite_loss_is_skipped_under_zero(tmp_path):
    """Rank 0 alone sees +inf added to its loss at step 3 (its gradients stay finite!): every rank skips
    the step, exactly like one process skipping it; NaN losses in a row then stop the run."""
    single, zero = str(tmp_path / "single"), str(tmp_path / "zero2")
    assert _nonfinite_worker(0, 1, single, [], {3}, "inf", 5) == 5
    res = run_workers(_nonfinite_worker, 2, zero, ["parallel.zero_stage=2", "train.batch_size=2"], {3}, "inf", 5,
                      timeout=300)
    assert res == [5, 5]
    a, b = by_step(zero), by_step(single)
    assert a[3]["skipped_steps"] == 1 and a[3]["grad_norm"] is None and a[2]["skipped_steps"] == 0
    assert_losses_close(a, b, [1, 2, 4, 5], "inf skip")
    assert_models_close(model_state(zero, 5), model_state(single, 5), "after a skipped step")
    stop = str(tmp_path / "stop")
    res = run_workers(_nonfinite_worker, 2, stop, ["parallel.zero_stage=1", "train.batch_size=2"], {4, 5}, "nan", 6,
                      timeout=300)
    assert all("2 non-finite losses in a row at step 5" in r for r in res), res
    assert ckpt.latest_checkpoint(stop).endswith("step_00000003")


def test_resume_across_zero_stages_and_world_sizes(runs, tmp_path):
    """Step-3 checkpoints resumed in another layout continue like the uninterrupted one-process run:
    ZeRO-2 on 2 ranks -> one process ZeRO-0; ZeRO-3 on 2 -> one process ZeRO-1; one process ZeRO-0 -> ZeRO-3 on 2;
    ZeRO-1 on 2 -> ZeRO-2 on 2; and ZeRO-2 on 2 -> ZeRO-2 on 2 (native, bitwise)."""
    single = by_step(runs["single"])
    one = ["train.batch_size=2", "train.grad_accum=2"]          # same global batch of 4 on one process
    cases = {"z2_to_single": (runs[2], one), "z3_to_z1_single": (runs[3], one + ["parallel.zero_stage=1"])}
    for name, (src, overrides) in cases.items():
        dst = str(tmp_path / name)
        seed_run_from(src, 3, dst)
        train(recipe(overrides), run_dir=dst, log=quiet)
        got = by_step(dst)
        assert sorted(got) == [4, 5, 6] and "converted from" in got[4]["resume_conversion"], name
        assert got[4]["resumed_from"].endswith("step_00000003")
        assert_losses_close(got, single, [4, 5, 6], name)
        assert_models_close(model_state(dst, 6), model_state(runs["single"], 6), name)
        assert sorted(os.listdir(os.path.join(dst, "checkpoints"))) == ["step_00000003", "step_00000006"]  # no litter
    jobs = []
    for name, src, overrides in (("single_to_z3", runs["single"], ["parallel.zero_stage=3"]),
                                 ("z1_to_z2", runs[1], ["parallel.zero_stage=2"]),
                                 ("z2_native", runs[2], ["parallel.zero_stage=2"])):
        dst = str(tmp_path / name)
        seed_run_from(src, 3, dst)
        jobs.append((dst, overrides + ["train.batch_size=2"]))
    run_workers(train_many_worker, 2, many(jobs), timeout=300)
    for dst, _ in jobs:
        got = by_step(dst)
        assert sorted(got) == [4, 5, 6]
        assert_losses_close(got, single, [4, 5, 6], dst)
    native = by_step(jobs[2][0])
    assert "resume_conversion" not in native[4]
    straight = by_step(runs[2])
    assert all(native[s]["loss"] == straight[s]["loss"] for s in (4, 5, 6))
    a, b = model_state(jobs[2][0], 6), model_state(runs[2], 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_global_batch_fails_with_the_documented_message(runs, tmp_path):
    dst = str(tmp_path / "bad")
    seed_run_from(runs[2], 3, dst)
    before = sorted(os.listdir(ckpt_dir(dst, 3)))
    import yaml
    from tests.zero_utils import recipe_dict
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(batch_size=2)))
    res = run_cli("train", str(path), "--run-dir", dst, timeout=240)
    assert res.returncode != 0
    err = [line for line in res.stderr.splitlines() if line.startswith("lctrain: error:")]
    assert len(err) == 1, res.stderr
    assert "global batch of 4 sequences, this run has 2" in err[0] and "--set train.grad_accum=2" in err[0]
    assert sorted(os.listdir(ckpt_dir(dst, 3))) == before
    assert ckpt.list_checkpoints(dst) == [ckpt_dir(dst, 3)]
    assert not os.path.exists(os.path.join(dst, "metrics.jsonl")) or rows(dst) == []


def test_export_consolidates_zero3_shards(runs, tmp_path):
    from lctrain.train.export import load_exported, load_exported_tokenizer
    out = tmp_path / "z3.safetensors"
    res = run_cli("export", runs[3], "--out", str(out), timeout=240)
    assert res.returncode == 0, res.stderr
    assert '"weights_from": "zero shards"' in res.stdout and '"step": 6' in res.stdout
    model, rec = load_exported(str(out))
    assert rec.name == "tiny" and model.lm_head.weight is model.embed.weight and not model.training
    sd = model.state_dict()
    ref = model_state(runs[3], STEPS)                       # rank 0's gathered copy of the same weights
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert_models_close(sd, model_state(runs["single"], STEPS), "export")
    tok = load_exported_tokenizer(str(out), str(tmp_path / "tok.model"))
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")[:16]])
    plain = recipe()
    plain.model.vocab_size = model.config.vocab_size
    from lctrain.models import build_model
    again = build_model(plain.model)
    again.load_state_dict(model_state(runs["single"], STEPS))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-4)
    bad = run_cli("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors"), timeout=240)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no such run" in bad.stderr
