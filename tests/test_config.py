"""Recipe loading and validation: every bad input is one line naming the field, exit != 0, no traceback."""
import os

import pytest
import yaml

from lctrain.config import apply_override, load_recipe, recipe_from_dict
from lctrain.schema import ConfigError
from tests.foundation_utils import ROOT, run_cli

QUICKSTART = os.path.join(ROOT, "recipes", "quickstart.yaml")


@pytest.mark.parametrize("override, field, words", [
    ("train.seq_lne=128", "train.seq_lne", "did you mean 'seq_len'"),          # unknown key + suggestion
    ("train.steps=many", "train.steps", "expected an integer"),              # wrong type
    ("optim.lr=-0.1", "optim.lr", "must be positive"),                       # bad value
    ("parallel.sp=3", "train.seq_len", "divisible by parallel.sp=3"),        # not divisible where it must be
    ("model.mixers.attention.n_heads=5", "model.mixers.attention.n_heads", "must divide d_model"),
    ("model.pattern=AQ", "model.pattern", "unknown letter 'Q'"),
    ("model.arch=transfomer", "model.arch", "did you mean 'transformer'"),
    ("tokenizer.path=/no/such.model", "tokenizer.path", "not found"),        # missing file
    ("data.source=jsonl", "data.paths", "needs at least one file"),
    ("logging.wandb=maybe", "logging.wandb", "must be one of"),
])
def test_bad_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_recipe(QUICKSTART, [override])
    msg = str(e.value)
    assert msg.startswith(field + ":"), msg
    assert words in msg and "\n" not in msg


def test_overrides_parse_yaml_values_and_create_nested_keys():
    r = load_recipe(QUICKSTART, ["train.steps=7", "optim.betas=[0.8, 0.9]", "model.mixers.attention.n_kv_heads=2",
                                 "run_dir=/tmp/x"])
    assert r.train.steps == 7 and r.optim.betas == [0.8, 0.9] and r.run_dir == "/tmp/x"
    assert r.model.mixers["attention"].n_kv_heads == 2
    raw = {"a": 1}
    with pytest.raises(ConfigError, match="a: is not a mapping"):
        apply_override(raw, "a.b=2")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override(raw, "novalue")


def test_resolved_recipe_round_trips():
    r = load_recipe(QUICKSTART)
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict())))
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("args, field", [
    (["info", "missing.yaml"], "recipe: file not found"),
    (["info", QUICKSTART, "--set", "train.bogus=1"], "train.bogus: unknown key"),
    (["info", QUICKSTART, "--set", "train.batch_size=x"], "train.batch_size: expected an integer"),
    (["train", QUICKSTART, "--set", "optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0"),
    (["tokenizer", "train", QUICKSTART, "--set", "tokenizer.vocab_size=10"], "tokenizer.vocab_size"),
])
def test_cli_errors_are_one_line(args, field, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    res = run_cli(*args)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
    assert field in err


def test_cli_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    res = run_cli("info", str(bad))
    assert res.returncode == 2 and "invalid YAML" in res.stderr and "Traceback" not in res.stderr


def test_info_reports_counts():
    res = run_cli("info", QUICKSTART)
    assert res.returncode == 0, res.stderr
    assert "non-embedding" in res.stdout and "flops/token" in res.stdout and "resolved recipe" in res.stdout


def test_yaml_boolean_words_select_the_option_meant():
    """YAML 1.1 reads unquoted on/off as booleans; a string option takes the word the user wrote."""
    path = os.path.join(ROOT, "recipes", "quickstart.yaml")
    r = load_recipe(path, ["logging.progress=on", "logging.wandb=off"])
    assert (r.logging.progress, r.logging.wandb) == ("on", "disabled")
    assert load_recipe(path, ["logging.progress=off"]).logging.progress == "off"
    with pytest.raises(ConfigError, match="train.precision"):
        load_recipe(path, ["train.precision=off"])
