"""The acceptance table of issue 14: bad inputs of every kind (recipe files, --set values, CLI arguments,
data paths, run directories, eval / export / tokenizer / launch arguments). Each one must give exactly one
line on stderr that names the cause (the field, flag or file), a non-zero exit status, and leave an
existing run directory byte-for-byte untouched. In-process calls of the real entry points (`lctrain.cli.main`,
`lctrain.train.launch.main`): the same code paths as the command line, without a torch import per case."""
import os

import pytest
import yaml

from lctrain.cli import main as cli_main
from lctrain.train.launch import main as launch_main
from tests.foundation_utils import tiny_recipe_dict


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 2 and 4) and the recipe that made it."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    d = tiny_recipe_dict(str(tmp / "cache"), steps=4, val_every=0)
    d["checkpoint"] = {"every": 2, "keep_last": 2}
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run = tmp / "run"
    assert cli_main(["train", str(recipe), "--run-dir", str(run)]) == 0
    files = {
        "empty": "",
        "comments": "# nothing but a comment\n\n# and another\n",
        "list": "- model\n- data\n",
        "scalar": "just a string\n",
        "nomodel": yaml.safe_dump({k: v for k, v in d.items() if k != "model"}),
        "nodata": yaml.safe_dump({k: v for k, v in d.items() if k != "data"}),
        "badyaml": "train: [unclosed\n",
        "unknown": yaml.safe_dump({**d, "trian": {"steps": 3}}),
        "model_list": yaml.safe_dump({**d, "model": [1, 2]}),
        "train_scalar": yaml.safe_dump({**d, "train": 5}),
        "tab": "model:\n\tarch: gla\n",
    }
    paths = {"recipe": str(recipe), "run": str(run), "missing": str(tmp / "missing.yaml"), "tmp": str(tmp)}
    for name, text in files.items():
        (tmp / f"{name}.yaml").write_text(text)
        paths[name] = str(tmp / f"{name}.yaml")
    return paths


def snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root) + "/"] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


R, RUN = "{recipe}", "{run}"
T = ["train", R, "--run-dir", RUN]          # a train command on the finished run

CASES = [
    # --- recipe files -------------------------------------------------------------------------------------
    ("empty recipe file", ["train", "{empty}", "--run-dir", RUN], ["recipe:", "empty.yaml is empty", "model and data"]),
    ("recipe of comments only", ["train", "{comments}", "--run-dir", RUN], ["comments.yaml is empty"]),
    ("recipe is a list", ["info", "{list}"], ["recipe:", "mapping at the top level", "list"]),
    ("recipe is a string", ["train", "{scalar}", "--run-dir", RUN], ["recipe:", "mapping at the top level"]),
    ("no model section", ["train", "{nomodel}", "--run-dir", RUN], ["model: missing from", "nomodel.yaml"]),
    ("no data section", ["train", "{nodata}", "--run-dir", RUN], ["data: missing from", "nodata.yaml"]),
    ("invalid YAML", ["train", "{badyaml}", "--run-dir", RUN], ["recipe:", "invalid YAML", "badyaml.yaml", "line"]),
    ("tab-indented YAML", ["info", "{tab}"], ["recipe:", "invalid YAML", "tab.yaml"]),
    ("missing recipe file", ["train", "{missing}", "--run-dir", RUN], ["recipe:", "file not found", "missing.yaml"]),
    ("misspelt section", ["train", "{unknown}", "--run-dir", RUN], ["trian: unknown key", "did you mean 'train'"]),
    ("model is a list", ["info", "{model_list}"], ["model:"]),
    ("train is a number", ["train", "{train_scalar}", "--run-dir", RUN], ["train: expected a mapping"]),
    # --- --set values ---------------------------------------------------------------------------------------
    ("typo in a key", T + ["--set", "train.seq_lne=128"], ["train.seq_lne: unknown key", "seq_len"]),
    ("not an integer", T + ["--set", "train.steps=many"], ["train.steps: expected an integer"]),
    ("negative lr", T + ["--set", "optim.lr=-0.1"], ["optim.lr: must be positive"]),
    ("zero batch", T + ["--set", "train.batch_size=0"], ["train.batch_size: must be positive"]),
    ("--set without =", T + ["--set", "train.steps"], ["--set: expected key.path=value"]),
    ("--set empty key path", T + ["--set", "train..steps=3"], ["--set: bad key path"]),
    ("--set into a scalar", T + ["--set", "seed.x=1"], ["seed: is not a mapping"]),
    ("unknown mixer letter", T + ["--set", "model.pattern=AQ"], ["model.pattern", "'Q'"]),
    ("misspelt arch", T + ["--set", "model.arch=transfomer"], ["model.arch", "transformer"]),
    ("heads do not divide d_model", T + ["--set", "model.mixers.attention.n_heads=5"],
     ["model.mixers.attention.n_heads: must divide d_model"]),
    ("sp does not divide seq_len", T + ["--set", "parallel.sp=3"], ["train.seq_len", "parallel.sp=3"]),
    ("unknown wandb mode", T + ["--set", "logging.wandb=maybe"], ["logging.wandb: must be one of"]),
    ("tiny vocabulary", T + ["--set", "tokenizer.vocab_size=10"], ["tokenizer.vocab_size"]),
    ("val_fraction of 1.5", T + ["--set", "data.val_fraction=1.5"], ["data.val_fraction"]),
    ("ZeRO stage 5", T + ["--set", "parallel.zero_stage=5"], ["parallel.zero_stage"]),
    ("keep_last 0", T + ["--set", "checkpoint.keep_last=0"], ["checkpoint.keep_last"]),
    ("fp8 precision", T + ["--set", "train.precision=fp8"], ["train.precision: must be one of"]),
    ("bad betas", T + ["--set", "optim.betas=[0.9]"], ["optim.betas"]),
    ("negative timeout", T + ["--set", "parallel.timeout_s=-1"], ["parallel.timeout_s"]),
    # --- data and tokenizer paths ---------------------------------------------------------------------------
    ("jsonl without paths", T + ["--set", "data.source=jsonl"], ["data.paths: needs at least one file"]),
    ("no file matches", T + ["--set", "data.source=jsonl", "--set", "data.paths=[/no/such/dir/*.jsonl]"],
     ["data.paths[0]", "/no/such/dir/*.jsonl"]),
    ("paths with builtin", T + ["--set", "data.paths=[a.jsonl]"], ["data.paths: must be empty"]),
    ("missing tokenizer file", T + ["--set", "tokenizer.path=/no/such.model"], ["tokenizer.path", "/no/such.model"]),
    # --- CLI arguments -------------------------------------------------------------------------------------
    ("no command", [], ["lctrain: error:", "COMMAND"]),
    ("unknown command", ["trian"], ["lctrain: error:", "trian"]),
    ("train without a recipe", ["train"], ["lctrain train: error:", "recipe"]),
    ("unknown flag", T + ["--frobnicate"], ["lctrain: error:", "--frobnicate"]),
    ("resume from nothing", T + ["--resume", "/no/such/ckpt"], ["no checkpoint found at /no/such/ckpt"]),
    # --- the run directory ---------------------------------------------------------------------------------
    ("other seq_len than the checkpoint", T + ["--set", "train.seq_len=32", "--set", "train.steps=8"],
     ["train.seq_len=64", "step_00000004"]),
    ("other global batch than the checkpoint", T + ["--set", "train.batch_size=2", "--set", "train.steps=8"],
     ["global batch", "step_00000004"]),
    # --- eval ----------------------------------------------------------------------------------------------
    ("passkey lengths not numbers", ["eval", "passkey", RUN, "--lengths", "abc"], ["--lengths"]),
    ("passkey depth above 1", ["eval", "passkey", RUN, "--depths", "0,2"], ["--depths: must be in [0, 1]"]),
    ("passkey zero samples", ["eval", "passkey", RUN, "--samples", "0"], ["--samples: must be positive"]),
    ("passkey unknown mitigation", ["eval", "passkey", RUN, "--mitigation", "bogus=1"], ["--mitigation"]),
    ("passkey of a missing run", ["eval", "passkey", "{tmp}/no-such-run"], ["no-such-run"]),
    ("length not a size", ["eval", "length", RUN, "--length", "abc"], ["--length"]),
    ("length negative samples", ["eval", "length", RUN, "--samples", "-1"], ["--samples: must be positive"]),
    ("length unknown mitigation", ["eval", "length", RUN, "--mitigation", "decay_scale=x"], ["--mitigation"]),
    ("length unknown source", ["eval", "length", RUN, "--source", "web"], ["--source", "web"]),
    # --- export / tokenizer / info -------------------------------------------------------------------------
    ("export without --out", ["export", RUN], ["lctrain export: error:", "--out"]),
    ("export of a missing run", ["export", "{tmp}/no-such-run", "--out", "{tmp}/m.safetensors"], ["no-such-run"]),
    ("export dtype fp8", ["export", RUN, "--out", "{tmp}/m.safetensors", "--dtype", "fp8"], ["--dtype", "fp8"]),
    ("tokenizer of an empty recipe", ["tokenizer", "train", "{empty}"], ["empty.yaml is empty"]),
    ("info with a bad --set", ["info", R, "--set", "train.batch_size=x"], ["train.batch_size: expected an integer"]),
]

LAUNCH = [
    ("zero processes", [R, "--nproc-per-node", "0"], ["--nproc-per-node: must be >= 1"]),
    ("processes not a number", [R, "--nproc-per-node", "two"], ["--nproc-per-node: must be an integer"]),
    ("negative restarts", [R, "--max-restarts", "-1"], ["--max-restarts: must be >= 0"]),
    ("two nodes without a host", [R, "--nnodes", "2"], ["--master-addr", "rendezvous host"]),
    ("node rank outside", [R, "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], ["--node-rank: 2 is outside"]),
    ("port out of range", [R, "--master-port", "70000"], ["--master-port: must be in 1..65535"]),
    ("sp does not divide the world", [R, "--nproc-per-node", "3", "--set", "parallel.sp=2"],
     ["parallel.sp: 2 does not divide the world size 3"]),
    ("launch an empty recipe", ["{empty}", "--nproc-per-node", "2"], ["empty.yaml is empty"]),
    ("launch resume from nothing", [R, "--resume", "/no/such/ckpt"], ["no checkpoint found at /no/such/ckpt"]),
    ("launch unknown flag", [R, "--nprocs", "2"], ["--nprocs"]),
]


def _check(world, capsys, call, args, words):
    args = [a.format(**world) for a in args]
    words = [w.format(**world) for w in words]
    before = snapshot(world["run"])
    try:
        code = call(args)
    except SystemExit as e:             # argparse-level errors exit (still one line)
        code = e.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code not in (0, None), (args, captured.out[-500:], captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("lctrain"), lines[0]
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert "Traceback" not in captured.err
    assert snapshot(world["run"]) == before, "the run directory changed"


@pytest.mark.parametrize("what, args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_line(world, capsys, what, args, words):
    _check(world, capsys, cli_main, args, words)


@pytest.mark.parametrize("what, args, words", LAUNCH, ids=[c[0] for c in LAUNCH])
def test_bad_launch_input_is_one_line(world, capsys, monkeypatch, what, args, words):
    for var in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS",
                "SLURM_NNODES", "SLURM_NODEID", "SLURM_GPUS_ON_NODE", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    _check(world, capsys, launch_main, args + ["--run-dir", RUN, "--dry-run"], words)


def test_the_table_is_large_enough():
    assert len(CASES) + len(LAUNCH) >= 40
