"""End to end: a small model trained by `lctrain train` on passkey-mixed data scores well above chance on
`lctrain eval passkey` at its training length; the eval CLI writes JSON and PNG files; bad checkpoint,
tokenizer and length arguments give one-line errors; a tiny study runs to a markdown report."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lctrain.cli import main
from lctrain.config import PasskeyEvalConfig, recipe_from_dict
from lctrain.data.corpus import builtin_documents
from lctrain.data.passkey import CHANCE, FILLER, NEEDLE, PREAMBLE, QUESTION
from lctrain.data.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


SEQ_LEN = 256       # training sequences (passkey documents are packed into them, state reset at each)
PK_LEN = 64         # passkey training documents: prompt + answer (7 tokens) <= PK_LEN tokens
PROMPT_LEN = PK_LEN - 7   # the longest passkey prompt seen in training: "the training length" of the task


def _tokenizer(path, vocab):
    """A BPE on a slice of the corpus plus some passkey text, so the protocol's words are single pieces."""
    docs = [t for _, t in itertools.islice(builtin_documents(), 80)]
    pk = " ".join([PREAMBLE] + [FILLER] * 3 + [NEEDLE.format(key="12345"), QUESTION + " 12345."])
    return train_tokenizer(iter([pk] * 300 + docs), path, vocab, 400_000)


def passkey_recipe(tmp, tok_path, docs=12000, **train) -> dict:
    """Mamba-2, 2 layers, d_model 64 (~80K parameters) on passkey documents of <= PK_LEN tokens (no
    preamble) mixed with a little of the built-in corpus; ~0.8M training tokens."""
    return {
        "name": "pk-test", "seed": 0,
        "model": {"arch": "mamba2", "d_model": 64, "n_layers": 2,
                  "mixers": {"mamba2": {"d_state": 16, "headdim": 16, "expand": 2}}},
        "tokenizer": {"path": tok_path},
        "data": {"source": "builtin", "max_bytes": 5_000, "val_fraction": 0.2, "cache_dir": os.path.join(tmp, "cache"),
                 "passkey": {"docs": docs, "min_tokens": 40, "max_tokens": PK_LEN, "preamble": False}},
        "train": {"steps": 800, "batch_size": 4, "seq_len": SEQ_LEN, "log_every": 100, "val_every": 0,
                  "val_batches": 1, "num_threads": 1, **train},
        "optim": {"lr": 6e-3, "warmup_steps": 20, "schedule": "constant"},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"wandb": "disabled", "progress": "off"},
    }


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return _tokenizer(str(tmp_path_factory.mktemp("tok") / "tok.model"), 1024).path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tok_path):
    """A run directory from two training steps: enough for the CLI's files and errors."""
    from lctrain.train.trainer import train
    tmp = str(tmp_path_factory.mktemp("tiny"))
    raw = passkey_recipe(tmp, tok_path, docs=200, steps=2, batch_size=4)
    run_dir = os.path.join(tmp, "run")
    assert train(recipe_from_dict(raw), run_dir=run_dir, log=lambda m: None)["status"] == "completed"
    return {"tmp": tmp, "run_dir": run_dir, "tok": tok_path, "raw": raw}


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory, tok_path):
    """The passkey model, trained once by `lctrain train` on passkey-mixed data (the slow part)."""
    from lctrain.train.trainer import train
    tmp = str(tmp_path_factory.mktemp("pk"))
    raw = passkey_recipe(tmp, tok_path)
    run_dir = os.path.join(tmp, "run")
    res = train(recipe_from_dict(raw), run_dir=run_dir, log=lambda m: None)
    assert res["status"] == "completed"
    return {"tmp": tmp, "run_dir": run_dir, "tok": tok_path, "raw": raw}


def test_passkey_trained_model_scores_well_above_chance(passkey_run):
    from lctrain.eval.loading import load_run
    from lctrain.eval.passkey import evaluate_passkey
    lm = load_run(passkey_run["run_dir"])
    cfg = PasskeyEvalConfig(lengths=[48, PROMPT_LEN], depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=8, seed=7)
    res = evaluate_passkey(lm.model, lm.tokenizer, cfg, preamble=False)
    acc = res["accuracy_by_length"][1]
    print(f"passkey accuracy at the training length ({PROMPT_LEN}-token prompts): {acc:.3f} "
          f"(by length {res['accuracy_by_length']}, chance {CHANCE:.1e})")
    assert acc >= 0.5, res["accuracy_by_length"]       # chance is ~1e-5
    # an untrained model of the same shape scores nothing: the signal is learned, not in the protocol
    torch.manual_seed(0)
    from lctrain.models import build_model
    fresh = build_model(lm.recipe.model).eval()
    assert evaluate_passkey(fresh, lm.tokenizer, cfg, preamble=False)["overall"] < 0.1


# --- the CLI writes its files -----------------------------------------------------------------------

def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_passkey_writes_json_and_heatmap(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "pk"
    code, out, err = _run(["eval", "passkey", tiny_run["run_dir"], "--lengths", f"48,{PROMPT_LEN}", "--depths",
                           "0,1", "--samples", "2", "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    res = json.loads((out_dir / "passkey.json").read_text())
    assert res["lengths"] == [48, PROMPT_LEN] and res["depths"] == [0.0, 1.0]
    assert len(res["accuracy"]) == 2 and len(res["accuracy"][0]) == 2
    assert len(res["records"]) == 2 * 2 * 2 and all(r["tokens"] == r["length"] for r in res["records"])
    assert res["model"]["train_len"] == SEQ_LEN and summary["overall"] == res["overall"]
    assert (out_dir / "passkey.png").read_bytes()[:8] == PNG


def test_cli_passkey_text_haystack(tiny_run, tmp_path, capsys):
    from lctrain.data.passkey import FILLER
    out_dir = tmp_path / "pk"
    code, out, err = _run(["eval", "passkey", tiny_run["run_dir"], "--lengths", "300", "--depths", "0.5",
                           "--samples", "2", "--haystack", "text", "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((out_dir / "passkey.json").read_text())
    assert res["haystack"] == "text" and res["needle_every"] == 0
    assert all(r["tokens"] == 300 for r in res["records"])
    with pytest.raises(SystemExit) as e:
        main(["eval", "passkey", tiny_run["run_dir"], "--lengths", "60", "--haystack", "banana"])
    assert e.value.code == 2 and "--haystack" in capsys.readouterr().err


def test_cli_length_writes_json_and_plots(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "len"
    code, out, err = _run(["eval", "length", tiny_run["run_dir"], "--length", "400", "--samples", "2",
                           "--mitigation", "none", "--mitigation", "decay_scale=2,state_window=32",
                           "--mitigation", "state_norm=auto", "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((out_dir / "length.json").read_text())
    assert res["train_len"] == SEQ_LEN and res["length"] == 400 and res["input"]["source"] == "heldout"
    assert list(res["mitigations"]) == ["none", "decay_scale=2,state_window=32", "state_norm=auto"]
    for name, m in res["mitigations"].items():
        assert sum(m["count"]) == 2 * 399 and all(x is not None for x in m["loss"])
        assert len(m["state"]) == 2 and len(m["state"][0]["norm"]) == len(res["state_positions"])
    assert SEQ_LEN in res["state_positions"]
    for f in ("length_loss.png", "length_state_norm_none.png", "length_state_norm_decay_scale_2_state_window_32.png",
              "length_state_norm_state_norm_auto.png"):
        assert (out_dir / f).read_bytes()[:8] == PNG, f


def test_cli_length_sizes_and_probes(tiny_run, tmp_path, capsys):
    """`--length 1k` (the one size syntax of every eval flag) and several probes in one call."""
    out_dir = tmp_path / "probes"
    code, out, err = _run(["eval", "length", tiny_run["run_dir"], "--length", "0.5k", "--samples", "2",
                           "--chunk-size", "0.25k", "--probe", "newlines", "--probe", "repeat:period=32",
                           "--mitigation", "none", "--mitigation", "state_window=auto", "--out", str(out_dir)], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["length"] == 512 and set(summary["probes"]) == {"newlines", "repeat:period=32"}
    assert "ETA" in err or "ETA" in out                               # progress lines (no TTY: plain lines)
    res = json.loads((out_dir / "newlines" / "length.json").read_text())
    assert res["samples"] == 1 and res["input"]["deterministic"] and res["chunk_size"] == 256
    assert res["mitigations"]["state_window=auto"]["state_window"] == SEQ_LEN       # W = the run's training length
    res = json.loads((out_dir / "repeat_period_32" / "length.json").read_text())
    assert res["samples"] == 2 and res["input"]["sample_tokens"] == [512, 512]


def test_cli_evaluates_an_exported_model(tiny_run, tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    code, _, err = _run(["export", tiny_run["run_dir"], "--out", str(f)], capsys)
    assert code == 0, err
    code, out, err = _run(["eval", "passkey", str(f), "--lengths", "48", "--depths", "0.5", "--samples", "2",
                           "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "eval" / "passkey.json").read_text())
    # the same weights give the same answers as the run directory
    code, _, err = _run(["eval", "passkey", tiny_run["run_dir"], "--lengths", "48", "--depths", "0.5", "--samples",
                         "2", "--out", str(tmp_path / "from_run"), "--quiet"], capsys)
    assert code == 0, err
    ref = json.loads((tmp_path / "from_run" / "passkey.json").read_text())
    assert [r["output"] for r in res["records"]] == [r["output"] for r in ref["records"]]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    code, _, err = _run(["eval", "passkey", str(bad)], capsys)
    _one_line_error(code, err, "not a safetensors file")


def test_cli_length_on_text_files(tiny_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(t for _, t in itertools.islice(builtin_documents(), 3)))
    code, out, err = _run(["eval", "length", tiny_run["run_dir"], "--text", str(text), "--length", "300",
                           "--samples", "1", "--source", "document", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "length.json").read_text())
    assert res["input"]["text"].startswith("text files") and res["input"]["sample_tokens"] == [300]


# --- one-line errors ---------------------------------------------------------------------------------

def _one_line_error(code, err, match):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lctrain: error:") and match in lines[0], lines[0]


def test_bad_checkpoint_arguments(tiny_run, tmp_path, capsys):
    run = tiny_run["run_dir"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(str(tmp_path / "missing"), "no such run or checkpoint directory"),
             (str(empty), "no checkpoint found"),
             (os.path.join(run, "recipe.yaml"), "is a file")]
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    ckpt = next((broken / "checkpoints").iterdir())
    (ckpt / "model.pt").write_bytes(b"garbage")
    cases.append((str(broken), "model.pt is corrupt"))             # caught by the checkpoint's manifest
    legacy = tmp_path / "legacy"                                   # no manifest: caught by the loader
    shutil.copytree(broken, legacy)
    os.remove(next((legacy / "checkpoints").iterdir()) / "manifest.json")
    cases.append((str(legacy), "cannot load model.pt"))
    mismatch = tmp_path / "mismatch"
    shutil.copytree(run, mismatch)
    recipe = yaml.safe_load((mismatch / "recipe.yaml").read_text())
    recipe["model"]["n_layers"] = 3
    (mismatch / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cases.append((str(mismatch), "weights do not match"))
    for path, match in cases:
        code, _, err = _run(["eval", "passkey", path, "--lengths", "64", "--samples", "1"], capsys)
        _one_line_error(code, err, match)


def test_bad_tokenizer_arguments(tiny_run, tmp_path, capsys):
    run = tiny_run["run_dir"]
    garbage = tmp_path / "g.model"
    garbage.write_bytes(b"not a model")
    bigger = _tokenizer(str(tmp_path / "big.model"), 1500)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(run, no_tok)
    os.remove(no_tok / "tokenizer.model")
    for argv, match in (([run, "--tokenizer", str(tmp_path / "nope.model")], "file not found"),
                        ([run, "--tokenizer", str(garbage)], "not a sentencepiece model"),
                        ([run, "--tokenizer", bigger.path], "not this model's tokenizer"),
                        ([str(no_tok)], "has no tokenizer.model")):
        code, _, err = _run(["eval", "length", *argv, "--length", "100"], capsys)
        _one_line_error(code, err, match)


def test_bad_length_arguments(tiny_run, capsys):
    run = tiny_run["run_dir"]
    for argv, match in ((["passkey", run, "--lengths", "abc"], "--lengths: expected a token count"),
                        (["passkey", run, "--lengths", "64,0"], "--lengths: must be >= 1"),
                        (["passkey", run, "--lengths", "10"], "shorter than the passkey prompt"),
                        (["passkey", run, "--depths", "0,1.5"], "--depths: must be in [0, 1]"),
                        (["passkey", run, "--samples", "0"], "--samples: must be positive"),
                        (["length", run, "--length", "1"], "--length: must be >= 2"),
                        (["length", run, "--length", "4k5"], "--length: expected a token count like 4096, 16k or 1m"),
                        (["length", run, "--length", "-3"], "--length: must be >= 2"),
                        (["length", run, "--chunk-size", "0"], "--chunk-size: must be >= 1"),
                        (["length", run, "--probe", "lines"], "--probe: unknown probe"),
                        (["length", run, "--probe", "newlines", "--text", "a.txt"], "either --probe or --text"),
                        (["length", run, "--mitigation", "state_window=auto*0"], "auto or auto*x"),
                        (["length", run, "--mitigation", "decay=2"], "unknown knob"),
                        (["length", run, "--text", "/nonexistent.txt", "--length", "64"], "file not found: /nonexistent.txt")):
        try:
            code = main(["eval", *argv])
        except SystemExit as e:          # argparse's own errors exit from parse_args
            code = e.code
        _, err = capsys.readouterr()
        _one_line_error(code, err, match)


def test_errors_through_the_real_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    for argv, match in ((["eval", "passkey", str(tmp_path / "missing")], "no such run"),
                        (["eval", "study", str(tmp_path / "missing.yaml")], "file not found")):
        p = subprocess.run([sys.executable, "-m", "lctrain.cli", *argv], capture_output=True, text=True,
                           timeout=120, env=env, cwd=ROOT)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and match in p.stderr


# --- studies -----------------------------------------------------------------------------------------

def _study(tmp_path, tiny_run, **over) -> str:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(passkey_recipe(tiny_run["tmp"], tiny_run["tok"], docs=200, steps=2, batch_size=4)))
    study = {"name": "tiny", "kind": "state_collapse", "base": "base.yaml", "description": "A test study.",
             "runs": [{"name": "short", "set": ["train.seq_len=48"]}, {"name": "long", "set": []}],
             "length": {"length": 300, "samples": 1, "mitigations": ["none", "state_window=32"]},
             "passkey": {"lengths": [64, 96], "depths": [0.0, 1.0], "samples": 1}, **over}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def test_study_runs_end_to_end_to_a_report(tiny_run, tmp_path, capsys):
    path = _study(tmp_path, tiny_run)
    out = tmp_path / "out"
    code, stdout, err = _run(["eval", "study", path, "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert json.loads(stdout.strip().splitlines()[-1])["report"] == str(out / "report.md")
    assert "| short |" in report and "| long |" in report and "`state_window=32`" in report
    images = [line.split("](", 1)[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(images) >= 2 * 3 + 3
    for img in images:
        assert (out / img).read_bytes()[:8] == PNG, img
    data = json.loads((out / "study.json").read_text())
    assert [r["model"]["train_len"] for r in data["runs"]] == [48, SEQ_LEN]
    # a second invocation does not train again (runs resume as finished) and rewrites the report
    code, _, err = _run(["eval", "study", path, "--out", str(out), "--quiet"], capsys)
    assert code == 0, err


def test_study_probes_seeds_references_verdicts_and_sweeps(tiny_run, tmp_path, capsys):
    path = _study(tmp_path, tiny_run, seeds=[0, 1],
                  runs=[{"name": "short", "set": ["train.seq_len=48"], "reference": "long"},
                        {"name": "long", "set": [], "probes": ["newlines", "heldout"]}],
                  length={"length": 300, "samples": 2, "probes": ["newlines", "heldout"], "warmup": 8,
                          "mitigations": ["none", "state_norm=auto", "state_window=auto", "state_window=auto*2"]},
                  mitigation_probes=["newlines"], passkey=None)
    out = tmp_path / "out"
    code, stdout, err = _run(["eval", "study", path, "--out", str(out)], capsys)
    assert code == 0, err
    assert "ETA" in err or "ETA" in stdout
    data = json.loads((out / "study.json").read_text())
    verdicts = {(v["run"], v["probe"]): v for v in data["analysis"]["verdicts"]}
    assert set(verdicts) == {(r, p) for r in ("short", "long") for p in ("newlines", "heldout")}
    v = verdicts[("short", "newlines")]
    assert v["reference"] == "long" and v["units_run"] == 2 and v["units_reference"] == 2   # 1 sample x 2 seeds
    assert v["verdict"] in ("collapse", "no collapse", "inconclusive") and v["ci"][0] <= v["statistic"] <= v["ci"][1]
    assert verdicts[("short", "heldout")]["units_run"] == 4                                 # 2 samples x 2 seeds
    own = verdicts[("long", "newlines")]                                   # no reference: its own rise
    assert own["reference"] is None and own["rise_reference"] is None and own["statistic"] == own["rise_run"]
    short = data["runs"][0]
    assert short["seeds"] == [0, 1] and os.path.isdir(out / "runs" / "short" / "seed1")
    assert list(short["length"]["heldout"]["mitigations"]) == ["none"]                     # mitigations: newlines only
    mits = short["length"]["newlines"]["mitigations"]
    assert mits["state_window=auto"]["state_window"] == 48 and mits["state_window=auto*2"]["state_window"] == 96
    assert len(mits["state_norm=auto"]["head_state_norm"]) == 2                            # per head, per layer
    assert short["length"]["newlines"]["diagnostics"]["heads"][0]["growth"] is not None
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "Head diagnostics" in report and "sweep_newlines.png" in report
    for img in [line.split("](", 1)[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / img).read_bytes()[:8] == PNG, img


def test_study_trains_runs_side_by_side_as_one_at_a_time(tiny_run, tmp_path, capsys):
    """jobs: 2 trains the (run, seed) pairs in two spawned processes; with the same threads per run the
    losses are those of training one run after another."""
    final = {}
    for jobs, threads in ((2, 2), (1, 1)):
        path = _study(tmp_path, tiny_run, kind="state_capacity", length=None, seeds=[0, 1], jobs=jobs, threads=threads)
        out = tmp_path / f"out{jobs}"
        code, _, err = _run(["eval", "study", path, "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
        runs = json.loads((out / "study.json").read_text())["runs"]
        final[jobs] = [(r["name"], seed, t["final_loss"]) for r in runs for seed, t in zip(r["seeds"], r["train_by_seed"])]
        assert all(os.path.isdir(out / "runs" / r / f"seed{k}") for r in ("short", "long") for k in (0, 1))
    assert final[2] == final[1] and len(final[1]) == 4 and all(loss is not None for *_, loss in final[1])
    code, _, err = _run(["eval", "study", _study(tmp_path, tiny_run, jobs=0)], capsys)
    _one_line_error(code, err, "jobs: must be >= 1")


def test_study_file_errors(tiny_run, tmp_path, capsys):
    for over, match in (({"length": None}, "length: a state_collapse study needs the length settings"),
                        ({"kind": "capacity"}, "kind: must be one of"),
                        ({"runs": [{"name": "a", "set": ["train.seq_lne=5"]}]}, "runs[0] (a): train.seq_lne: unknown key"),
                        ({"runs": [{"name": "a"}, {"name": "a"}]}, "duplicate run names"),
                        ({"base": "nope.yaml"}, "base: training recipe not found"),
                        ({"length": {"length": 300, "mitigations": ["bogus"]}}, "length.mitigations[0]")):
        code, _, err = _run(["eval", "study", _study(tmp_path, tiny_run, **over)], capsys)
        _one_line_error(code, err, match)


def test_shipped_study_recipes_validate():
    from lctrain.eval.study import load_study
    for name in ("state-collapse.yaml", "state-capacity.yaml"):
        study = load_study(os.path.join(ROOT, "recipes", "studies", name))
        assert study.config.runs and os.path.isfile(study.base_path)
