"""Study analysis without training: probe sources, verdict logic, recall length / capacity, the shared
size syntax, progress lines with ETA, and `lctrain info STUDY`."""
import io
import os

import numpy as np
import pytest

from lctrain.cli import main
from lctrain.config import LengthEvalConfig, recipe_from_dict
from lctrain.eval.probes import build_probe, parse_probe
from lctrain.eval.progress import Progress
from lctrain.eval.sizes import format_size, parse_size, parse_sizes
from lctrain.eval.study import (VerdictConfig, capacity_point, collapse_verdict, fit_trend, recall_length,
                                 seed_recalls)
from lctrain.schema import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _CharTok:
    """A character tokenizer: one id per character (newline = one piece), enough for the probe builders."""
    eod_id = 0

    def encode(self, text):
        return [ord(c) % 250 + 1 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def _text_recipe(tmp_path):
    paths = []
    for i in range(60):                                     # one document per text file
        paths.append(tmp_path / f"doc{i}.txt")
        rng = np.random.default_rng(i)
        paths[-1].write_text(f"document {i}: " + "".join(rng.choice(list("abcdefghijklmnop"), 50 + 10 * i)))
    return recipe_from_dict({"data": {"source": "text", "paths": [str(p) for p in paths], "val_fraction": 0.5}})


# --- probes ------------------------------------------------------------------------------------------

def test_parse_probe_specs_and_errors():
    assert parse_probe("newlines").name == "newlines" and parse_probe("newlines").prefix == 0
    assert parse_probe(" newlines:prefix=8").prefix == 8
    assert parse_probe("repeat:period=32").period == 32 and parse_probe("repeat").period == 64
    assert parse_probe("file:a.txt,b.txt").paths == ("a.txt", "b.txt")
    assert parse_probe("heldout:samples=16").samples == 16 and parse_probe("heldout:samples=16").name == "heldout:samples=16"
    assert parse_probe("newlines:samples=2,prefix=4").name == "newlines:prefix=4,samples=2"
    for bad, msg in (("lines", "unknown probe"), ("newlines:period=3", "bad option"), ("repeat:period=x", "integer"),
                     ("file:", "needs a path"), ("repeat:period=0", "period and samples >= 1"), ("", "expected a probe")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_probe(bad, "length.probes[0]")
        assert str(e.value).startswith("length.probes[0]") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"eval.length.probes\[1\]"):
        recipe_from_dict({"eval": {"length": {"probes": ["heldout", "bogus"]}}})


def test_probe_sources_build_the_streams_they_describe(tmp_path):
    tok, recipe = _CharTok(), _text_recipe(tmp_path)
    nl = tok.encode("\n")[0]
    s, info = build_probe(parse_probe("newlines"), recipe, tok, 500, samples=4)
    assert len(s) == 1 and info["deterministic"] and (s[0] == nl).all() and s[0].size == 500
    s, info = build_probe(parse_probe("newlines:prefix=20"), recipe, tok, 500, samples=3)
    assert len(s) == 3 and all(x.size == 500 and (x[20:] == nl).all() for x in s)
    assert len({x[:20].tobytes() for x in s}) == 3                        # different held-out prefixes
    s, info = build_probe(parse_probe("repeat:period=30"), recipe, tok, 500, samples=2)
    assert all(x.size == 500 and (x[30:] == x[:-30]).all() for x in s)   # period 30 exactly
    assert s[0][:30].tobytes() != s[1][:30].tobytes()
    s, info = build_probe(parse_probe("heldout"), recipe, tok, 700, samples=2)
    assert [x.size for x in s] == [700, 700] and info["documents"] > 1 and "held-out" in info["text"]
    s, _ = build_probe(parse_probe("documents"), recipe, tok, 10_000, samples=2)
    assert len(s) == 2 and s[0].size >= s[1].size
    f = tmp_path / "probe.txt"
    f.write_text("xyz" * 50)
    s, info = build_probe(parse_probe(f"file:{f}"), recipe, tok, 400, samples=1)
    assert s[0].size == 400 and set(s[0][:150].tolist()) == set(tok.encode("xyz"))
    with pytest.raises(ValueError, match="file not found"):
        build_probe(parse_probe("file:/nonexistent.txt"), recipe, tok, 100, samples=1)


# --- verdicts ----------------------------------------------------------------------------------------

def _length_result(within, beyond, units=6, noise=0.05, L=64, T=1024, seed=0):
    """A synthetic length result: per-unit losses `within` on [16, L) and `beyond` on [L, T)."""
    edges = [1, 16, L, T]
    rng = np.random.default_rng(seed)
    ls, cs = [], []
    for _ in range(units):
        c = [15, L - 16, T - L]
        m = [5.0, within + noise * rng.standard_normal(), beyond + noise * rng.standard_normal()]
        ls.append([a * b for a, b in zip(m, c)])
        cs.append(c)
    return {"train_len": L, "warmup": 16, "length": T, "edges": edges,
            "mitigations": {"none": {"loss_samples": ls, "count_samples": cs}}}


def test_collapse_verdict_against_a_reference_and_alone():
    cfg = VerdictConfig(threshold=0.5, resamples=500)
    ref = _length_result(2.5, 2.2, seed=1)                               # the long twin improves with context
    v = collapse_verdict(_length_result(2.0, 3.5), ref, cfg)
    assert v["verdict"] == "collapse" and v["ci"][0] > 0.5
    assert v["statistic"] == pytest.approx((3.5 - 2.0) - (2.2 - 2.5), abs=0.15)
    assert collapse_verdict(_length_result(2.0, 1.9), ref, cfg)["verdict"] == "no collapse"
    # a rise of ~0.5 with noisy units straddles the threshold: neither verdict can be claimed
    noisy = _length_result(2.0, 2.2, noise=1.0, units=4, seed=3)
    assert collapse_verdict(noisy, ref, cfg)["verdict"] == "inconclusive"
    # no reference: the run's own rise
    v = collapse_verdict(_length_result(2.0, 3.0), None, cfg)
    assert v["verdict"] == "collapse" and v["rise_reference"] is None and v["statistic"] == pytest.approx(1.0, abs=0.1)
    # warm-up positions (loss 5.0 on [1, 16)) never enter "within"
    assert v["rise_run"] == pytest.approx(1.0, abs=0.1)
    short = _length_result(2.0, 3.0, T=64)
    assert collapse_verdict(short, None, cfg)["verdict"] == "n/a"


# --- capacity ----------------------------------------------------------------------------------------

def test_recall_length_interpolates_and_censors():
    lengths = [64, 128, 256, 512]
    assert recall_length([1.0, 1.0, 1.0, 1.0], lengths, 0.8) == 512
    assert recall_length([0.5, 1.0, 1.0, 1.0], lengths, 0.8) is None
    assert recall_length([1.0, 0.9, 0.7, 0.0], lengths, 0.8) == pytest.approx(2 ** (7 + 0.5))
    assert recall_length([1.0, 0.6, 0.9, 1.0], lengths, 0.8) == pytest.approx(2 ** (6 + 0.5))   # first drop counts


def _passkey(acc_by_len, lengths, n=20):
    recs = []
    for L, a in zip(lengths, acc_by_len):
        k = int(round(a * n))
        recs += [{"length": L, "correct": i < k} for i in range(n)]
    return {"lengths": lengths, "records": recs}


def test_capacity_points_and_trend():
    lengths = [64, 128, 256, 512, 1024]
    pts = []
    for state, acc in ((100, [1, 0.6, 0, 0, 0]), (400, [1, 1, 0.6, 0, 0]), (1600, [1, 1, 1, 0.6, 0])):
        cp = capacity_point(_passkey(acc, lengths), 0.8, resamples=300)
        assert cp["ci"][0] <= cp["recall"] <= cp["ci"][1]
        pts.append({"name": str(state), "state": state, **cp})
    assert [p["recall"] for p in pts] == sorted(p["recall"] for p in pts)
    fit = fit_trend(pts)
    assert fit["slope"] == pytest.approx(0.5, abs=0.01)                  # recall x2 per state x4
    assert fit["slope_ci"][0] <= fit["slope"] <= fit["slope_ci"][1]
    assert fit_trend(pts[:1]) is None


def test_per_seed_recall_lengths():
    lengths = [64, 128, 256, 512]
    a, b = _passkey([1, 1, 0.2, 0], lengths), _passkey([1, 0.5, 0, 0], lengths)
    pooled = {"lengths": lengths, "records": [{**r, "seed": 0} for r in a["records"]]
              + [{**r, "seed": 1} for r in b["records"]]}
    assert seed_recalls(pooled, 0.8) == [recall_length([1, 1, 0.2, 0], lengths, 0.8),
                                         recall_length([1, 0.5, 0, 0], lengths, 0.8)]
    assert seed_recalls(a, 0.8) == [recall_length([1, 1, 0.2, 0], lengths, 0.8)]     # untagged: one seed


# --- one size syntax; progress; info -----------------------------------------------------------------

def test_one_size_syntax():
    assert [parse_size(x, "--length") for x in ("4096", "16k", "16K", "1m", "1.5k", 300)] == \
        [4096, 16384, 16384, 1048576, 1536, 300]
    assert parse_sizes("256,512, 1k", "--lengths") == [256, 512, 1024]
    assert format_size(16384) == "16k" and format_size(1048576) == "1m" and format_size(1000) == "1000"
    for bad, msg in (("abc", "token count like"), ("0", ">= 1"), ("1.3k", "whole number"), ("-5", ">= 1")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_size(bad, "--length")
        assert str(e.value).startswith("--length")


def test_progress_prints_plain_lines_with_eta_without_a_tty():
    lines = []
    p = Progress(1000, "length 1k", log=lines.append, every_s=0.0, tty=False)
    for _ in range(4):
        p.update(250)
    assert len(lines) == 4 and all("ETA" in x and "\r" not in x for x in lines)
    assert "100.0%" in lines[-1] and "1,000/1,000 tok" in lines[-1]
    buf = io.StringIO()
    p = Progress(10, "passkey", stream=buf, tty=True)
    for _ in range(10):
        p.update()
    p.close()
    assert buf.getvalue().startswith("\r") and buf.getvalue().endswith("\n") and "ETA 0:00" in buf.getvalue()


def test_length_eval_logs_progress_with_eta():
    import torch
    from lctrain.eval.length import evaluate_length
    from lctrain.models import build_model
    cfg = recipe_from_dict({"model": {"arch": "mamba2", "d_model": 32, "n_layers": 1, "vocab_size": 50,
                                      "mixers": {"mamba2": {"d_state": 8, "headdim": 16}}}}).model
    model = build_model(cfg).eval()
    lines = []
    evaluate_length(model, [np.arange(200) % 50], LengthEvalConfig(length=200, samples=1, chunk_size=64),
                    train_len=32, log=lines.append)
    assert any("ETA" in x for x in lines), lines


def test_study_eta_counts_every_seed_and_each_probes_samples():
    from lctrain.eval.study import _work, load_study
    study = load_study(os.path.join(ROOT, "recipes", "studies", "state-collapse.yaml"),
                       ["seeds=[0, 1, 2]", "length.probes=[newlines, heldout:samples=16]", "length.samples=3",
                        "mitigation_probes=[newlines]"])
    stages = _work(study)
    assert len(dict(stages)) == len(stages)                          # no stage overwrites another
    runs, seeds = len(study.config.runs), 3
    assert sum(1 for s, _ in stages if s.startswith("train ")) == runs * seeds
    T, passes = study.config.length.length, len(study.config.length.mitigations)
    held = [u for s, u in stages if s.endswith("heldout:samples=16")]
    nl = [u for s, u in stages if s.endswith(" newlines")]
    assert held == [16.0 * T] * (runs * seeds) and nl == [3.0 * passes * T] * (runs * seeds)


@pytest.mark.parametrize("name", ["state-collapse.yaml", "state-capacity.yaml"])
def test_info_describes_a_study(name, capsys):
    assert main(["info", os.path.join(ROOT, "recipes", "studies", name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study ") and "train len" in out and "lctrain eval study" in out
    from lctrain.eval.study import load_study
    for run in load_study(os.path.join(ROOT, "recipes", "studies", name)).config.runs:
        assert f"\n{run.name} " in out
    if name == "state-capacity.yaml":
        assert "2 runs trained at once" in out and "training documents ask up to 4 questions" in out
