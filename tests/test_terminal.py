"""What a person sees (issue 14, items 14, 17, 18, 20): plain progress lines with an ETA when no bar is
drawn (pipes, SLURM/nohup logs, a zero-width terminal), a bar and messages that never overwrite each other
on a terminal, a rerun of a finished run that says so in valid JSON, SIGINT's exit status, `info`'s state
description per architecture, and the next commands after training."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lctrain.cli import main
from lctrain.train import metrics as metrics_mod
from tests.foundation_utils import ROOT, read_metrics, tiny_recipe_dict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def write_recipe(path, cache_dir, progress="auto", **train):
    d = tiny_recipe_dict(cache_dir, **{"steps": 6, "log_every": 2, "val_every": 0, **train})
    d["logging"] = {"wandb": "disabled", "progress": progress}
    d["checkpoint"] = {"every": 3, "keep_last": 2}
    path.write_text(yaml.safe_dump(d))
    return str(path)


class FakeTTY(io.StringIO):
    """One terminal both stdout and stderr write to (tqdm draws on stderr, messages go to stdout)."""

    def __init__(self, shared=None):
        super().__init__()
        self.shared = shared if shared is not None else self

    def write(self, s):
        return io.StringIO.write(self.shared, s) if self.shared is not self else super().write(s)

    def isatty(self):
        return True

    def fileno(self):
        return 2


def render(raw: str) -> list[str]:
    """The terminal's lines after carriage returns / clears: what the person actually reads."""
    lines, cur = [], []
    col = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        elif ch == "\r":
            col = 0
        elif ch == "\x1b":                      # ANSI escapes (tqdm moves the cursor up): skip the sequence
            j = i + 1
            while j < len(raw) and not raw[j].isalpha():
                j += 1
            i = j
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
        i += 1
    if cur:
        lines.append("".join(cur).rstrip())
    return lines


def test_no_tty_prints_plain_progress_lines_with_eta(cache_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", cache_dir)
    assert main(["train", recipe, "--run-dir", str(tmp_path / "run")]) == 0      # capsys: not a terminal
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"], out
    assert all("loss " in s and " tok/s" in s for s in steps)
    assert all(" ETA " in s for s in steps[:-1])
    assert json.loads(next(line for line in out if line.startswith("{")))["status"] == "completed"


def test_zero_width_terminal_gets_lines_not_a_bar(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    assert not metrics_mod.interactive("auto")
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 40)))
    assert metrics_mod.interactive("auto")


def test_bar_and_messages_do_not_overwrite_each_other(cache_dir, tmp_path, monkeypatch):
    term = FakeTTY()
    out = FakeTTY(shared=term)
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((100, 40)))
    recipe = write_recipe(tmp_path / "r.yaml", cache_dir)
    assert main(["train", recipe, "--run-dir", str(tmp_path / "run")]) == 0
    lines = render(term.getvalue())
    saved = [line for line in lines if "checkpoint saved" in line]
    assert len(saved) == 2, lines
    assert all(line.startswith("checkpoint saved: ") and "it/s" not in line and "%|" not in line for line in saved), saved
    assert any("%|" in line for line in lines)                       # the bar was drawn
    assert not any(line.startswith("step ") for line in lines)        # and no duplicate plain lines


def test_rerun_of_a_finished_run_says_complete_in_valid_json(cache_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", cache_dir, steps=3, log_every=1)
    run = tmp_path / "run"
    assert main(["train", recipe, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    before = {p: (run / p).read_bytes() for p in ("metrics.jsonl", "recipe.yaml")}
    assert main(["train", recipe, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "budget" not in out and "NaN" not in out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["status"] == "already_complete" and result["step"] == 3
    assert result["loss"] == read_metrics(str(run))[-1]["loss"]
    assert {p: (run / p).read_bytes() for p in before} == before          # nothing rewritten
    assert "lctrain eval length" in out and "lctrain eval passkey" in out   # the next commands


def test_json_lines_never_hold_nan():
    line = metrics_mod.json_line({"loss": float("nan"), "x": [float("inf"), 1.0], "y": {"z": -float("inf")}})
    assert json.loads(line) == {"loss": None, "x": [None, 1.0], "y": {"z": None}}


def test_sigint_saves_and_exits_130(cache_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", cache_dir, steps=100000, log_every=1)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lctrain.cli", "train", recipe, "--run-dir", str(run)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in out and json.loads(out.splitlines()[-1])["status"] == "interrupted"
    assert "Traceback" not in err


@pytest.mark.parametrize("recipe, words, absent", [
    ("transformer-cpu.yaml", ["KV cache growing with length", "attention layers Ax4"], "constant in length"),
    ("mamba2-cpu.yaml", ["constant in length", "Mx4"], "KV cache"),
    ("hybrid-cpu.yaml", ["constant in length", "Mx6", "KV cache growing", "Ax2"], None),
    ("quickstart.yaml", ["constant in length"], "KV cache"),
])
def test_info_describes_state_per_architecture(recipe, words, absent, capsys):
    assert main(["info", os.path.join(ROOT, "recipes", recipe)]) == 0
    state = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("state"))
    assert all(w in state for w in words), state
    assert absent is None or absent not in state, state


def test_quickstart_is_a_hybrid_of_our_mixers():
    from lctrain.config import load_recipe
    r = load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"))
    letters = set(r.model.pattern)
    assert {"M", "G", "W"} <= letters and "A" not in letters, r.model.pattern


def test_the_printed_next_commands_run_on_a_small_hybrid(cache_dir, tmp_path, capsys):
    """The commands printed after training work on a hybrid of M, G and W layers (their state rows have
    different head counts: `eval length` used to fail on them)."""
    d = tiny_recipe_dict(cache_dir, steps=2, val_every=0, seq_len=32)
    d["model"] = {"arch": "transformer", "d_model": 64, "n_layers": 3, "pattern": "MGW",
                  "mixers": {"mamba2": {"d_state": 16, "headdim": 16}, "gla": {"n_heads": 2}, "swa": {"n_heads": 4, "window": 16}}}
    d["logging"] = {"wandb": "disabled", "progress": "off"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    cmds = [line.split("#")[0].split()[1:] for line in out.splitlines() if line.startswith("  lctrain ")]
    assert [c[:2] for c in cmds] == [["eval", "length"], ["eval", "passkey"], ["export", str(run)]], cmds
    length = cmds[0] + ["--out", str(tmp_path / "eval")]
    assert main(length) == 0
    assert main(cmds[2]) == 0 and (run / "model.safetensors").is_file()
