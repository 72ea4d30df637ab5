"""Checkpoints cannot run code or be silently corrupt (issue 14, items 1, 2, 4, 5).

Every bad checkpoint below is refused by `lctrain train` (resume) with one 'lctrain: error:' line that
names the file and the cause, a non-zero exit, and a run directory byte-identical to before."""
import json
import os

import pytest
import torch

from lctrain.config import recipe_from_dict
from lctrain.train import checkpoint as ckpt
from lctrain.train.trainer import train
from tests.foundation_utils import tiny_recipe_dict
from tests.rundir_utils import (base, cache_dir, cli, copy_run, error_line, quiet, recipe_file,  # noqa: F401 (fixtures)
                                 rehash, snapshot, train_cli)


class Payload:
    """Unpickling it runs a shell command (creates the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))




@pytest.fixture(scope="module")
def zero_base(cache_dir, tmp_path_factory):
    """The issue's reproduction: 4 steps with parallel.zero_stage=1 on one process."""
    root = tmp_path_factory.mktemp("zbase")
    d = tiny_recipe_dict(cache_dir, steps=4, val_every=0, device="cpu")
    d["checkpoint"] = {"every": 2, "keep_last": 3}
    d["parallel"] = {"zero_stage": 1}
    import yaml
    recipe = str(root / "r.yaml")
    with open(recipe, "w") as f:
        yaml.safe_dump(d, f)
    run = str(root / "run")
    train(recipe_from_dict(d), run_dir=run, log=quiet)
    return recipe, run


def _latest(run):
    return ckpt.latest_checkpoint(run)


def _plant(path, marker):
    torch.save({"x": Payload(str(marker))}, path)


# --- 1. nothing we load may unpickle arbitrary objects -----------------------------------------------
@pytest.mark.parametrize("target,manifest_too", [
    ("zero/mp_rank_00_model_states.pt", True),                 # the reproduction (manifest rewritten too)
    ("zero/zero_pp_rank_0_mp_rank_00_optim_states.pt", True),   # an optimizer shard
    ("zero/mp_rank_00_model_states.pt", False),                 # manifest left alone: caught as corrupt first
])
def test_planted_pickle_in_zero_checkpoint_is_refused_and_never_run(zero_base, tmp_path, target, manifest_too):
    recipe, src = zero_base
    run = copy_run(src, str(tmp_path / "run"))
    marker = tmp_path / "PWNED"
    c = _latest(run)
    _plant(os.path.join(c, target), marker)
    if manifest_too:
        rehash(c)
    before = snapshot(run)
    # the reproduction runs the real command in a new process; the other cases in this one
    line = error_line(train_cli(recipe, run, env={} if manifest_too and "model_states" in target else None))
    assert not marker.exists(), "the planted pickle ran"
    assert os.path.basename(target) in line
    assert ("posix.system" in line or "os.system" in line) if manifest_too else "corrupt" in line
    assert snapshot(run) == before
    # export and eval refuse it too, before DeepSpeed reads it
    line = error_line(cli("export", run, "--out", str(tmp_path / "m.safetensors")))
    assert not marker.exists() and os.path.basename(target) in line


def test_resume_with_conversion_vets_the_shards(zero_base, tmp_path):
    """Resuming a ZeRO-1 checkpoint with ZeRO-0 goes through DeepSpeed's universal converter
    (unrestricted unpickling): the shards are vetted first."""
    recipe, src = zero_base
    run = copy_run(src, str(tmp_path / "run"))
    marker = tmp_path / "PWNED"
    c = _latest(run)
    _plant(os.path.join(c, "zero", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), marker)
    rehash(c)
    before = snapshot(run)
    line = error_line(train_cli(recipe, run, "--set", "parallel.zero_stage=0"))
    assert not marker.exists() and "refusing to load" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("target", ["model.pt", "optim.pt", "rng_rank0.pt"])
def test_planted_pickle_in_torch_checkpoint_is_refused(base, tmp_path, target):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    marker = tmp_path / "PWNED"
    c = _latest(run)
    _plant(os.path.join(c, target), marker)
    rehash(c)
    before = snapshot(run)
    line = error_line(train_cli(recipe, run))
    assert not marker.exists() and target in line and "refusing to load" in line
    assert snapshot(run) == before


# --- 2. nothing trusted at a predictable path ---------------------------------------------------------
def test_planted_exported_tokenizer_is_not_trusted(base, tmp_path, monkeypatch):
    from lctrain.train.export import export, load_exported_tokenizer
    monkeypatch.setenv("LCTRAIN_CACHE", str(tmp_path / "cache"))
    _, run = base
    out = str(tmp_path / "m.safetensors")
    export(run, out)
    first = load_exported_tokenizer(out)
    with open(first.path, "rb") as f:
        good = f.read()
    with open(os.path.join(run, "tokenizer.model"), "rb") as f:
        assert f.read() == good
    # someone replaces the file at the path the tokenizer is cached at
    with open(first.path, "wb") as f:
        f.write(b"\x00planted, not a tokenizer")
    again = load_exported_tokenizer(out)
    with open(again.path, "rb") as f:
        assert f.read() == good
    assert again.encode("hello world") == first.encode("hello world")


# --- 4. content hashes --------------------------------------------------------------------------------
def test_every_checkpoint_has_a_manifest_of_its_files(base):
    _, run = base
    for c in ckpt.list_checkpoints(run):
        m = json.load(open(os.path.join(c, "manifest.json")))
        assert sorted(m["files"]) == sorted(k for k, v in snapshot(c).items() if v != "dir" and k != "manifest.json")
        assert all(m["files"][k]["sha256"] == v for k, v in snapshot(c).items() if k in m["files"])
        assert {"model.pt", "optim.pt", "rng_rank0.pt", "state.json", "recipe.yaml"} <= set(m["files"])
        assert ckpt.verify_checkpoint(c) is True


def _flip(path, n=64):
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.seek(size // 2)
        chunk = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


CORRUPTIONS = {
    "model.pt bytes flipped": (lambda c: _flip(os.path.join(c, "model.pt")), "model.pt is corrupt"),
    "optim.pt bytes flipped": (lambda c: _flip(os.path.join(c, "optim.pt")), "optim.pt is corrupt"),
    "optim.pt truncated": (lambda c: open(os.path.join(c, "optim.pt"), "r+b").truncate(100), "optim.pt is corrupt"),
    "model.pt deleted": (lambda c: os.remove(os.path.join(c, "model.pt")), "model.pt is missing"),
    "file added": (lambda c: open(os.path.join(c, "extra.pt"), "wb").write(b"x"), "extra.pt is not in its manifest"),
    "state.json edited": (lambda c: open(os.path.join(c, "state.json"), "a").write(" "), "state.json is corrupt"),
    "manifest garbage": (lambda c: open(os.path.join(c, "manifest.json"), "w").write("{"), "manifest.json: unreadable"),
    "manifest wrong format": (lambda c: open(os.path.join(c, "manifest.json"), "w").write('{"format": 1}'),
                              "manifest.json: field 'format'"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_refused_naming_the_file(base, tmp_path, case):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    damage, expect = CORRUPTIONS[case]
    damage(_latest(run))
    before = snapshot(run)
    line = error_line(train_cli(recipe, run))
    assert expect in line, line
    assert "step_00000002" in line and "verifies" in line      # the way out: the previous good checkpoint
    assert snapshot(run) == before


def test_resume_from_the_previous_good_checkpoint_sets_the_corrupt_one_aside(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    _flip(os.path.join(ckpt.latest_checkpoint(run), "model.pt"))
    prev = ckpt.list_checkpoints(run)[0]
    res = train_cli(recipe, run, "--resume", prev, "--set", "checkpoint.keep_last=1")
    assert res.returncode == 0, res.stderr
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(run)] == ["step_00000004"]
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    moved = os.listdir(os.path.join(run, "superseded"))
    assert len(moved) == 1 and os.listdir(os.path.join(run, "superseded", moved[0], "checkpoints")) == ["step_00000004"]


def test_pruning_never_removes_the_checkpoint_just_saved(tmp_path):
    """publish keeps the new checkpoint and counts keep_last back from it; later ones are not its to prune."""
    run = str(tmp_path / "run")
    for step in (2, 4, 6):
        os.makedirs(os.path.join(run, "checkpoints", f"step_{step:08d}"))
        open(os.path.join(run, "checkpoints", f"step_{step:08d}", "state.json"), "w").write("{}")
    tmp = ckpt.staging_dir(run, 3)
    open(os.path.join(tmp, "state.json"), "w").write("{}")
    rehash(tmp)
    final = ckpt.publish(tmp, keep_last=1)
    names = [os.path.basename(c) for c in ckpt.list_checkpoints(run)]
    assert final.endswith("step_00000003") and names == ["step_00000003", "step_00000004", "step_00000006"]


# --- 5. metadata validated like a recipe ----------------------------------------------------------------
STATES = {
    "empty object": ({}, "field 'step' is missing"),
    "not an object": ([1, 2], "expected a JSON object"),
    "step a string": ({"step": "4"}, "field 'step' must be an integer"),
    "negative consumed": ({"consumed": -1}, "field 'consumed' must be an integer >= 0"),
    "python rng cut": ({"python": [3, [1, 2], None]}, "field 'python'"),
    "numpy rng wrong": ({"numpy": ["PCG64", [], 0, 0, 0.0]}, "field 'numpy'"),
    "unknown format": ({"format": "pickle"}, "field 'format'"),
    "zero stage 7": ({"zero_stage": 7}, "field 'zero_stage'"),
    "world size 0": ({"world_size": 0}, "field 'world_size'"),
}


@pytest.mark.parametrize("case", sorted(STATES))
def test_bad_state_json_names_the_file_and_field(base, tmp_path, case):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    c = _latest(run)
    patch, expect = STATES[case]
    st = json.load(open(os.path.join(c, "state.json")))
    if isinstance(patch, dict) and patch:
        st.update(patch)
    else:
        st = patch
    json.dump(st, open(os.path.join(c, "state.json"), "w"))
    rehash(c)                 # a consistent manifest: the content itself is what is wrong
    before = snapshot(run)
    line = error_line(train_cli(recipe, run))
    assert "state.json" in line and expect in line, line
    assert snapshot(run) == before


def test_legacy_checkpoint_without_manifest_still_resumes_and_says_so(base, tmp_path):
    recipe, src = base
    run = copy_run(src, str(tmp_path / "run"))
    for c in ckpt.list_checkpoints(run):
        os.remove(os.path.join(c, "manifest.json"))
    res = train_cli(recipe, run)
    assert res.returncode == 0, res.stderr
    assert "has no manifest (written by an older lctrain): its content is not verified" in res.stdout


def test_world_writable_data_cache_is_refused(base, tmp_path):
    """The tokenizer / token cache is reused by name: a directory anyone can write to is not trusted."""
    recipe, _ = base
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    os.chmod(shared, 0o777)
    run = str(tmp_path / "run")
    line = error_line(train_cli(recipe, run, "--set", f"data.cache_dir={shared}"))
    assert line.startswith("lctrain: error: data.cache_dir:") and "can be written by other users" in line
    assert os.listdir(shared) == [] and not os.path.exists(run)


EXPORT_META = {
    "ties not JSON": ({"ties": "["}, "metadata field 'ties'"),
    "ties a list": ({"ties": "[1]"}, "metadata field 'ties'"),
    "no recipe": ({"recipe": ""}, "metadata field 'recipe' is missing"),
    "step not a number": ({"step": "four"}, "metadata field 'step'"),
    "tokenizer not base64": ({"tokenizer_model_b64": "%%%"}, "metadata field 'tokenizer_model_b64'"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_META))
def test_bad_exported_metadata_names_the_field(base, tmp_path, case):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from lctrain.train.export import export
    _, run = base
    good, bad = str(tmp_path / "good.safetensors"), str(tmp_path / "bad.safetensors")
    export(run, good)
    with safe_open(good, "pt") as f:
        meta = dict(f.metadata())
    patch, expect = EXPORT_META[case]
    save_file(load_file(good), bad, metadata={**meta, **patch})
    line = error_line(cli("eval", "passkey", bad, "--lengths", "64", "--samples", "1"))
    assert "bad.safetensors" in line and expect in line, line
