"""Studies: a YAML recipe that trains a few variants of one model and evaluates them, end to end, into a
markdown report with plots (`lctrain eval study recipes/studies/X.yaml`).

    name: state-collapse
    kind: state_collapse          # or state_capacity
    base: ../mamba2-cpu.yaml      # the training recipe every run starts from (relative to this file)
    set: [train.steps=200]        # overrides for every run
    runs:                         # the variants: a name and their own overrides
      - {name: L64, set: [train.seq_len=64]}
      - {name: L256, set: [train.seq_len=256]}
    length: {length: 8192, mitigations: [none, decay_scale=2]}   # lctrain eval length settings
    passkey: {lengths: [128, 256, 512]}                           # lctrain eval passkey settings

- `state_collapse`: every run gets the length study (`length`, required): per-position loss far beyond
  its training length with each mitigation, per-head state norms; plus the passkey grid if `passkey`.
- `state_capacity`: every run gets the passkey grid (`passkey`, required), summarised as accuracy vs
  length per run, against the run's recurrent state size; plus the length study if `length`.

Runs are trained into OUT/runs/<name> and resume there, so a finished run is not trained again
(re-running a study only re-evaluates). OUT defaults to runs/studies/<name>.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import yaml

from lctrain.config import (LengthEvalConfig, PasskeyEvalConfig, apply_override, load_recipe_dict,
                            recipe_from_dict)
from lctrain.schema import ConfigError, fail, from_dict, require


@dataclass
class StudyRun:
    name: str = ""
    set: list[str] = field(default_factory=list)     # recipe overrides of this run
    label: str = ""                                  # legend label (default: name)

    def validate(self, path):
        require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), f"{path}.name",
                f"must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")


@dataclass
class StudyConfig:
    name: str = "study"
    kind: Literal["state_collapse", "state_capacity"] = "state_collapse"
    description: str = ""
    base: str = ""                                   # training recipe (relative to the study file)
    set: list[str] = field(default_factory=list)     # overrides for every run
    runs: list[StudyRun] = field(default_factory=list)
    out_dir: Optional[str] = None                    # default runs/studies/<name>
    threads: int = 0                                 # torch CPU threads for training and eval (0: default)
    length: Optional[LengthEvalConfig] = None
    passkey: Optional[PasskeyEvalConfig] = None

    def validate(self, path):
        require(bool(self.base), "base", "must name the training recipe every run starts from")
        require(bool(self.runs), "runs", "must list at least one run")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "runs", f"duplicate run names: {', '.join(dup)}")
        if self.kind == "state_collapse":
            require(self.length is not None, "length", "a state_collapse study needs the length settings")
        else:
            require(self.passkey is not None, "passkey", "a state_capacity study needs the passkey settings")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclass
class Study:
    config: StudyConfig
    path: str                                        # the study file
    base_path: str                                   # the resolved base recipe

    def recipe(self, run: StudyRun):
        raw = load_recipe_dict(self.base_path)
        for a in self.config.set:
            apply_override(raw, a)
        raw["name"] = f"{self.config.name}-{run.name}"
        return recipe_from_dict(raw, run.set)


def load_study(path: str, overrides: Optional[list[str]] = None) -> Study:
    """Read and validate a study file; every run's recipe is validated too (before anything runs)."""
    if not os.path.isfile(path):
        raise ConfigError("study", f"file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError("study", f"invalid YAML in {path}{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(raw, dict):
        raise ConfigError("study", f"{path} must hold a mapping at the top level")
    for a in overrides or []:
        apply_override(raw, a)
    cfg = from_dict(StudyConfig, raw, "")
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), cfg.base))
    if not os.path.isfile(base):
        fail("base", f"training recipe not found: {cfg.base} (resolved to {base})")
    study = Study(cfg, path, base)
    for i, run in enumerate(cfg.runs):
        try:
            study.recipe(run)
        except ConfigError as e:
            raise ConfigError(f"runs[{i}] ({run.name})", str(e)) from None
    return study


# --- running ---------------------------------------------------------------------------------------

def _train(study: Study, run: StudyRun, run_dir: str, log) -> dict:
    from lctrain.train.trainer import train
    recipe = study.recipe(run)
    if study.config.threads and not recipe.train.num_threads:
        recipe.train.num_threads = study.config.threads
    t0 = time.perf_counter()
    res = train(recipe, run_dir=run_dir, resume="auto", log=lambda m: log(f"[{run.name}] {m}"))
    finite = lambda x: x if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None
    return {"status": res["status"], "step": res["step"], "loss": finite(res.get("loss")),
            "val_loss": finite(res.get("val_loss")), "seconds": time.perf_counter() - t0}


def _final_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    last, last_val = {}, None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                last = rec
                if "val_loss" in rec:
                    last_val = rec["val_loss"]
    return {"final_loss": last.get("loss"), "final_val_loss": last_val, "tokens": last.get("tokens")}


def run_study(study: Study, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """Train every run (or resume / skip finished ones), evaluate, write OUT/report.md; returns its path."""
    from lctrain.eval import plots
    from lctrain.eval.length import build_samples, evaluate_length, write_length_outputs
    from lctrain.eval.loading import load_run
    from lctrain.eval.passkey import evaluate_passkey
    cfg = study.config
    out = out_dir or cfg.out_dir or os.path.join("runs", "studies", cfg.name)
    os.makedirs(out, exist_ok=True)
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    results = []
    for run in cfg.runs:
        run_dir = os.path.join(out, "runs", run.name)
        log(f"=== {run.name}: training ({' '.join(run.set) or 'base recipe'}) -> {run_dir}")
        trained = _train(study, run, run_dir, log)
        if trained["status"] not in ("completed", "already_complete"):      # a rerun: finished runs train nothing
            log(f"=== {run.name}: training {trained['status']} at step {trained['step']}; stopping the study "
                "(run the same command to resume)")
            return ""
        lm = load_run(run_dir)
        entry = {"name": run.name, "label": run.label or run.name, "set": run.set, "run_dir": run_dir,
                 "model": lm.describe(), "train": {**trained, **_final_metrics(run_dir)}}
        ev_dir = os.path.join(out, run.name)
        if cfg.length is not None:
            log(f"=== {run.name}: length study ({cfg.length.length} tokens x {cfg.length.samples})")
            samples, info = build_samples(lm.recipe, lm.tokenizer, cfg.length)
            res = evaluate_length(lm.model, samples, cfg.length, train_len=lm.train_len,
                                  log=lambda m: log(f"[{run.name}] {m}"))
            res["input"] = info
            files = write_length_outputs(res, ev_dir, title=f"{run.label or run.name} (trained at {lm.train_len})")
            _dump(os.path.join(ev_dir, "length.json"), {"model": lm.describe(), **res})
            entry["length"], entry["length_files"] = res, files
        if cfg.passkey is not None:
            log(f"=== {run.name}: passkey grid {cfg.passkey.lengths} x {cfg.passkey.depths}")
            pk_pre = cfg.passkey.preamble if cfg.passkey.preamble is not None else lm.recipe.data.passkey.preamble
            res = evaluate_passkey(lm.model, lm.tokenizer, cfg.passkey, preamble=pk_pre,
                                   log=lambda m: log(f"[{run.name}] {m}"))
            mark, label = lm.passkey_mark()
            png = plots.passkey_heatmap(res, os.path.join(ev_dir, "passkey.png"), train_len=mark, train_label=label,
                                        title=f"{run.label or run.name}: passkey (overall {res['overall']:.2f})")
            _dump(os.path.join(ev_dir, "passkey.json"), {"model": lm.describe(), **res})
            entry["passkey"], entry["passkey_png"] = res, png
        results.append(entry)
    summary_files = _summary_plots(cfg, results, out)
    elapsed = time.perf_counter() - t_start
    _dump(os.path.join(out, "study.json"), {"study": dataclasses.asdict(cfg), "runs": results,
                                            "summary_plots": summary_files, "seconds": elapsed})
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(_report(study, results, summary_files, out, elapsed))
    log(f"report: {path} ({elapsed:.0f}s)")
    return path


def _dump(path: str, obj: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _summary_plots(cfg: StudyConfig, results: list[dict], out: str) -> dict[str, str]:
    from lctrain.eval import plots
    files = {}
    with_len = [r for r in results if "length" in r]
    if with_len:
        curves, tls = {}, []
        for r in with_len:
            L = r["length"]
            centers = [b["center"] for b in L["buckets"]]
            base = next(iter(L["mitigations"]))          # the baseline pass comes first
            curves[f"{r['label']} (trained at {L['train_len']})"] = (centers, L["mitigations"][base]["loss"])
            tls.append(L["train_len"])
        files["loss_by_run"] = plots.loss_vs_position(curves, os.path.join(out, "loss_by_run.png"), train_lens=tls,
                                                      title="per-position loss, no mitigation")
        # the largest per-head state norm of each run vs position (one line per run and mitigation)
        series, pos = {}, None
        for r in with_len:
            L = r["length"]
            if not L["state_layers"]:
                continue
            pos = L["state_positions"]
            for name, m in L["mitigations"].items():
                series[f"{r['label']}: {name}"] = [
                    max((x for layer in m["state"] for x in layer["norm"][i] if x is not None), default=float("nan"))
                    for i in range(len(pos))]
        if series and len({len(r["length"]["state_positions"]) for r in with_len}) == 1:
            files["max_state_norm"] = plots.lines(pos, series, os.path.join(out, "max_state_norm.png"),
                                                  "position (tokens)", "largest head state norm",
                                                  title="largest per-head state norm vs position", train_lens=tls)
    with_pk = [r for r in results if "passkey" in r]
    if with_pk:
        x = with_pk[0]["passkey"]["lengths"]
        if all(r["passkey"]["lengths"] == x for r in with_pk):
            series = {f"{r['label']} (state {r['model']['state_elements']:,})": r["passkey"]["accuracy_by_length"]
                      for r in with_pk}
            marks = sorted({r["model"].get("passkey_train_len") or r["model"]["train_len"] for r in with_pk})
            files["passkey_accuracy"] = plots.lines(
                x, series, os.path.join(out, "passkey_accuracy.png"), "context length (tokens)",
                "passkey accuracy (mean over depths)", title="passkey accuracy vs length",
                train_lens=marks, ylim=(-0.02, 1.02),
                train_label="longest passkey training doc" if any(r["model"].get("passkey_train_len") for r in with_pk)
                else "training length")
    return files


def _f(x, nd=3) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _rel(path: str, out: str) -> str:
    return os.path.relpath(path, out)


def _report(study: Study, results: list[dict], summary: dict, out: str, elapsed: float) -> str:
    cfg = study.config
    L = []
    L.append(f"# Study: {cfg.name} ({cfg.kind.replace('_', ' ')})\n")
    if cfg.description:
        L.append(cfg.description.strip() + "\n")
    L.append(f"Command: `lctrain eval study {study.path}` — base recipe `{os.path.relpath(study.base_path)}`"
             f"{' with ' + ', '.join(f'`{s}`' for s in cfg.set) if cfg.set else ''}. "
             f"Total wall time {elapsed / 60:.1f} min on {os.cpu_count()} CPU core(s) ({platform.machine()}).\n")
    L.append("## Runs\n")
    L.append("| run | overrides | params | recurrent state (elements) | train len | steps | tokens | final loss | val loss |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m, t = r["model"], r["train"]
        tl = str(m["train_len"]) + (f" (passkey docs ≤ {m['passkey_train_len']})" if m.get("passkey_train_len") else "")
        tok = f"{t['tokens']:,}" if isinstance(t.get("tokens"), int) else "n/a"
        L.append(f"| {r['label']} | {' '.join(f'`{s}`' for s in r['set']) or '—'} | {m['params']:,} | "
                 f"{m['state_elements']:,} | {tl} | {t['step']} | {tok} | "
                 f"{_f(t.get('final_loss'))} | {_f(t.get('final_val_loss'))} |")
    L.append("")
    with_len = [r for r in results if "length" in r]
    if with_len:
        first = with_len[0]["length"]
        inp = first.get("input", {})
        L.append("## Length extrapolation (state collapse)\n")
        L.append(f"Each run reads {first['samples']} sequences of {first['length']:,} tokens: {inp.get('text', '')}, "
                 f"source `{inp.get('source')}`"
                 + (" (held-out documents joined by a blank line into one stream, no end-of-document token and "
                    "no state reset)" if inp.get("source") == "concat" else "")
                 + (f"; the held-out pool ({inp.get('pool_tokens'):,} tokens) was cycled to reach the length"
                    if inp.get("wrapped") else "")
                 + f". Loss is bucketed by position ({first['buckets_per_octave']} buckets per doubling). "
                 "Mitigations are applied at inference only.\n")
        L.append("| run | mitigation | loss within train len | loss beyond train len | loss, last bucket | "
                 "max head state norm | tokens/s |")
        L.append("|---|---|---|---|---|---|---|")
        for r in with_len:
            for name, m in r["length"]["mitigations"].items():
                cap = f" (cap {m['state_norm_cap']:.3g})" if "state_norm_cap" in m else ""
                L.append(f"| {r['label']} | `{name}`{cap} | {_f(m['loss_within_train_len'])} | "
                         f"{_f(m['loss_beyond_train_len'])} | {_f(m['loss_last_bucket'])} | "
                         f"{_g(m.get('max_state_norm'))} | "
                         f"{m['tokens_per_s']:,.0f} |")
        L.append("")
        L.extend(_length_findings(with_len))
        if "loss_by_run" in summary:
            L.append(f"![loss by run]({_rel(summary['loss_by_run'], out)})\n")
        if "max_state_norm" in summary:
            L.append(f"![max state norm]({_rel(summary['max_state_norm'], out)})\n")
        for r in with_len:
            L.append(f"### {r['label']}\n")
            for key, path in r["length_files"].items():
                L.append(f"![{r['label']} {key}]({_rel(path, out)})")
            L.append("")
    with_pk = [r for r in results if "passkey" in r]
    if with_pk:
        pk = with_pk[0]["passkey"]
        L.append("## Passkey retrieval\n")
        L.append(f"{pk['samples']} random 5-digit keys per (length, depth) cell, depths {pk['depths']}, greedy decoding "
                 f"of {pk['max_new_tokens']} tokens, correct = first number in the output equals the key "
                 f"(chance {pk['chance']:.1e}); preamble {'on' if pk['preamble'] else 'off'}.\n")
        lengths = pk["lengths"]
        L.append("| run | recurrent state | " + " | ".join(str(n) for n in lengths) + " | overall |")
        L.append("|---|---|" + "---|" * len(lengths) + "---|")
        for r in with_pk:
            p = r["passkey"]
            L.append(f"| {r['label']} | {r['model']['state_elements']:,} | "
                     + " | ".join(f"{a:.2f}" for a in p["accuracy_by_length"]) + f" | {p['overall']:.2f} |")
        L.append("")
        for r in with_pk:
            p = r["passkey"]
            ok = [n for n, a in zip(lengths, p["accuracy_by_length"]) if a >= 0.5]
            L.append(f"- **{r['label']}** (state {r['model']['state_elements']:,} elements): accuracy "
                     f"{p['accuracy_by_length'][0]:.2f} at {lengths[0]} tokens, {p['accuracy_by_length'][-1]:.2f} at "
                     f"{lengths[-1]}; longest length with accuracy >= 0.5: {max(ok) if ok else 'none'}.")
        L.append("")
        if "passkey_accuracy" in summary:
            L.append(f"![passkey accuracy]({_rel(summary['passkey_accuracy'], out)})\n")
        for r in with_pk:
            L.append(f"![{r['label']} passkey]({_rel(r['passkey_png'], out)})")
        L.append("")
    L.append("---\nGenerated by `lctrain eval study`; all numbers are in `study.json`.\n")
    return "\n".join(L)


def _length_findings(with_len: list[dict]) -> list[str]:
    """Plain statements read off the numbers (no interpretation beyond them)."""
    out = []
    for r in with_len:
        mits = r["length"]["mitigations"]
        base_name = next(iter(mits))
        b = mits[base_name]
        if b["loss_within_train_len"] is None or b["loss_last_bucket"] is None:
            continue
        d = b["loss_last_bucket"] - b["loss_within_train_len"]
        line = (f"- **{r['label']}** (`{base_name}`): loss {b['loss_within_train_len']:.3f} within the training length, "
                f"{_f(b['loss_beyond_train_len'])} beyond it, {b['loss_last_bucket']:.3f} in the last bucket "
                f"({'+' if d >= 0 else ''}{d:.3f}).")
        others = [(n, m["loss_last_bucket"]) for n, m in mits.items() if n != base_name and m["loss_last_bucket"] is not None]
        if others:
            best = min(others, key=lambda x: x[1])
            line += (f" Best mitigation in the last bucket: `{best[0]}` ({best[1]:.3f}, "
                     f"{'+' if best[1] - b['loss_last_bucket'] >= 0 else ''}{best[1] - b['loss_last_bucket']:.3f} vs none).")
        out.append(line)
    if out:
        out.append("")
    return out
