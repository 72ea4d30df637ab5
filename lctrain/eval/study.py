"""Studies: a YAML recipe that trains a few variants of one model and evaluates them, end to end, into a
markdown report with plots, verdicts and confidence intervals (`lctrain eval study recipes/studies/X.yaml`).

    name: state-collapse
    kind: state_collapse          # or state_capacity
    base: ../mamba2-cpu.yaml      # the training recipe every run starts from (relative to this file)
    set: [train.steps=200]        # overrides for every run
    seeds: [0, 1]                 # train every run once per seed (CIs pool seeds x samples); default: recipe's
    jobs: 2                       # train 2 runs at once, each in its own process (threads / jobs threads each)
    runs:                         # the variants: a name, their own overrides, optionally their probes and
      - {name: L64, set: [train.seq_len=64], reference: L1024}        # the twin the verdict compares with
      - {name: L1024, set: [train.seq_len=1024]}
    length: {length: 8192, probes: [newlines, heldout], mitigations: [none, state_norm=auto]}
    mitigation_probes: [newlines] # run the mitigations on these probes only (default: all)
    verdict: {threshold: 0.5}     # nats; see below
    passkey: {lengths: [128, 256, 512]}                           # lctrain eval passkey settings

- `state_collapse`: every run gets the length study on every probe: per-position loss far beyond its
  training length with each mitigation (`auto` values resolved per run and per head), per-head state
  statistics, head diagnostics, a strength sweep plot per mitigation knob, and a verdict per run and probe.
  Verdict: rise(run) = loss over [L, T) minus loss over [warmup, L) (L: the run's training length, T: the
  probe length); with a `reference` run (the long-trained twin), the statistic is rise(run) minus the
  reference's loss change over the same positions, otherwise rise(run) itself. "collapse" when the lower
  end of its 95% bootstrap CI (units: samples x seeds, resampled per run) exceeds `threshold` nats, "no
  collapse" when the upper end is below it, else "inconclusive".
- `state_capacity`: every run gets the passkey grid: accuracy per length with bootstrap CIs over prompts,
  the maximum recall length (longest context whose accuracy, and every shorter one's, is >= `capacity.accuracy`,
  interpolated in log length between grid points; CI by bootstrap) against the run's recurrent state size,
  and a least-squares power-law fit recall ∝ state^slope.

Runs are trained into OUT/runs/<name> (several seeds: OUT/runs/<name>/seed<k>) and resume there, so a
finished run is not trained again (re-running a study only re-evaluates). OUT defaults to runs/studies/<name>.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import yaml

from lctrain.config import (LengthEvalConfig, PasskeyEvalConfig, apply_override, load_recipe_dict,
                            recipe_from_dict)
from lctrain.schema import ConfigError, fail, from_dict, require


@dataclass
class StudyRun:
    name: str = ""
    set: list[str] = field(default_factory=list)     # recipe overrides of this run
    label: str = ""                                  # legend label (default: name)
    probes: list[str] = field(default_factory=list)  # this run's probes (default: the study's length.probes)
    reference: str = ""                              # the run the verdict compares with (its long-trained twin)

    def validate(self, path):
        require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), f"{path}.name",
                f"must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")
        from lctrain.eval.probes import parse_probe
        for i, p in enumerate(self.probes):
            parse_probe(p, f"{path}.probes[{i}]")


@dataclass
class VerdictConfig:
    threshold: float = 0.5           # nats: the loss rise (vs the reference) that counts as collapse
    confidence: float = 0.95         # bootstrap CI level
    resamples: int = 2000

    def validate(self, path):
        require(self.threshold > 0, f"{path}.threshold", f"must be > 0, got {self.threshold}")
        require(0 < self.confidence < 1, f"{path}.confidence", f"must be in (0, 1), got {self.confidence}")
        require(self.resamples >= 100, f"{path}.resamples", f"must be >= 100, got {self.resamples}")


@dataclass
class CapacityConfig:
    accuracy: float = 0.8            # recall length = longest context with passkey accuracy >= this

    def validate(self, path):
        require(0 < self.accuracy <= 1, f"{path}.accuracy", f"must be in (0, 1], got {self.accuracy}")


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
    jobs: int = 1                                    # runs trained at once, each in its own process with
                                                     # threads / jobs torch threads (many small models, few cores)
    length: Optional[LengthEvalConfig] = None
    passkey: Optional[PasskeyEvalConfig] = None
    seeds: list[int] = field(default_factory=list)   # train each run once per seed (default: the recipe's)
    mitigation_probes: list[str] = field(default_factory=list)   # mitigations on these probes (default: all)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def validate(self, path):
        require(bool(self.base), "base", "must name the training recipe every run starts from")
        require(bool(self.runs), "runs", "must list at least one run")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "runs", f"duplicate run names: {', '.join(dup)}")
        for i, r in enumerate(self.runs):
            require(not r.reference or r.reference in names, f"runs[{i}].reference",
                    f"names no run of this study: {r.reference!r}")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"repeats a seed: {self.seeds}")
        if self.kind == "state_collapse":
            require(self.length is not None, "length", "a state_collapse study needs the length settings")
        else:
            require(self.passkey is not None, "passkey", "a state_capacity study needs the passkey settings")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.jobs >= 1, "jobs", f"must be >= 1, got {self.jobs}")


@dataclass
class Study:
    config: StudyConfig
    path: str                                        # the study file
    base_path: str                                   # the resolved base recipe

    def recipe(self, run: StudyRun, seed: Optional[int] = None):
        raw = load_recipe_dict(self.base_path)
        for a in self.config.set:
            apply_override(raw, a)
        raw["name"] = f"{self.config.name}-{run.name}"
        if seed is not None:
            raw["seed"] = seed
        return recipe_from_dict(raw, run.set)

    def seeds(self) -> list[Optional[int]]:
        return list(self.config.seeds) or [None]

    def run_dir(self, out: str, run: StudyRun, seed: Optional[int]) -> str:
        base = os.path.join(out, "runs", run.name)
        return base if len(self.seeds()) == 1 else os.path.join(base, f"seed{seed}")

    def probes(self, run: StudyRun) -> list[str]:
        from lctrain.eval.length import probe_specs
        return list(run.probes) or probe_specs(self.config.length)


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

def _train(study: Study, run: StudyRun, seed: Optional[int], run_dir: str, log, threads: int = 0) -> dict:
    from lctrain.train.trainer import train
    recipe = study.recipe(run, seed)
    threads = threads or study.config.threads
    if threads and not recipe.train.num_threads:
        recipe.train.num_threads = threads
    t0 = time.perf_counter()
    tag = run.name if seed is None else f"{run.name} seed {seed}"
    res = train(recipe, run_dir=run_dir, resume="auto", log=lambda m: log(f"[{tag}] {m}"))
    finite = lambda x: x if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None
    return {"status": res["status"], "step": res["step"], "loss": finite(res.get("loss")),
            "val_loss": finite(res.get("val_loss")), "seconds": time.perf_counter() - t0}


def _train_job(study: Study, run: StudyRun, seed: Optional[int], run_dir: str, threads: int) -> dict:
    """One run's training in a worker process of `_train_parallel` (its log lines go to stdout)."""
    return _train(study, run, seed, run_dir, lambda m: print(m, flush=True), threads)


def _train_parallel(study: Study, out: str, log, done) -> dict:
    """Train every (run, seed) of the study, `jobs` at a time, each in a spawned process with
    max(1, threads / jobs) torch threads: on a few cores, small models train faster side by side than
    one after another on all the cores (per-op overheads dominate). The data (tokenizer, token cache)
    is prepared here first, once per distinct recipe, so the workers do not build it twice.
    Returns {(run name, seed): the `_train` result}."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from lctrain.data.dataset import prepare_data
    from lctrain.schema import to_dict
    cfg = study.config
    todo = [(run, seed, study.run_dir(out, run, seed)) for run in cfg.runs for seed in study.seeds()]
    prepared = set()
    for run, seed, _ in todo:
        recipe = study.recipe(run, seed)
        data_key = json.dumps([to_dict(recipe.data), to_dict(recipe.tokenizer)], sort_keys=True)   # what the cache depends on
        if data_key not in prepared:
            prepared.add(data_key)
            prepare_data(recipe, log=log)
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // cfg.jobs)
    log(f"=== training {len(todo)} runs, {cfg.jobs} at a time ({threads} thread{'s' * (threads > 1)} each)")
    results = {}
    with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, study, run, seed, run_dir, threads): (run, seed) for run, seed, run_dir in todo}
        for fut in cf.as_completed(futures):
            run, seed = futures[fut]
            results[(run.name, seed)] = fut.result()
            done(f"train {run.name} {seed}")
    return results


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


def _work(study: Study) -> list[tuple[str, float]]:
    """(stage, work units) of the whole study, for its ETA: 3 units per training token (forward +
    backward), 1 per evaluated token (passes x samples x length, passkey prompt tokens)."""
    from lctrain.eval.probes import parse_probe
    cfg = study.config
    stages = []
    for run in cfg.runs:
        for seed in study.seeds():
            r = study.recipe(run, seed)
            stages.append((f"train {run.name} {seed}", 3.0 * r.train.steps * r.train.batch_size * r.train.grad_accum
                           * r.train.seq_len))
            if cfg.length is not None:
                for p in study.probes(run):
                    passes = len(_mitigations_for(cfg, p))
                    samples = parse_probe(p).samples or cfg.length.samples
                    stages.append((f"length {run.name} {seed} {p}", float(passes * samples * cfg.length.length)))
            if cfg.passkey is not None:
                pk = cfg.passkey
                stages.append((f"passkey {run.name} {seed}", float(sum(pk.lengths) * len(pk.depths) * pk.samples)))
    return stages


def _mitigations_for(cfg: StudyConfig, probe: str) -> list[str]:
    if cfg.mitigation_probes and probe not in cfg.mitigation_probes:
        return ["none"]
    return list(cfg.length.mitigations)


def run_study(study: Study, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """Train every run (or resume / skip finished ones), evaluate, write OUT/report.md; returns its path
    ("" if a run's training was interrupted)."""
    from lctrain.eval.length import (build_samples, evaluate_length, head_diagnostics, json_ready,
                                     write_length_outputs)
    from lctrain.eval.loading import load_run
    from lctrain.eval.passkey import evaluate_passkey, prompt_settings
    from lctrain.eval.plots import slug
    from lctrain.eval.progress import Progress
    cfg = study.config
    out = out_dir or cfg.out_dir or os.path.join("runs", "studies", cfg.name)
    os.makedirs(out, exist_ok=True)
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    stages = _work(study)
    units = dict(stages)
    prog = Progress(sum(units.values()), f"study {cfg.name}", unit="work", every_s=0.0, tty=False, log=log)
    done = lambda stage: prog.update(units.get(stage, 0.0))
    # extra bucket edges: every run's training length and warm-up, so verdicts compare equal positions
    extra = set()
    if cfg.length is not None:
        for run in cfg.runs:
            L = study.recipe(run).train.seq_len
            extra |= {L, min(cfg.length.warmup, max(1, L // 2))}
    results = []
    trained_at_once = _train_parallel(study, out, log, done) if cfg.jobs > 1 else {}
    for run in cfg.runs:
        per_seed = []
        for seed in study.seeds():
            run_dir = study.run_dir(out, run, seed)
            trained = trained_at_once.get((run.name, seed))
            if trained is None:
                log(f"=== {run.name}{'' if seed is None else f' seed {seed}'}: training "
                    f"({' '.join(run.set) or 'base recipe'}) -> {run_dir}")
                trained = _train(study, run, seed, run_dir, log)
                done(f"train {run.name} {seed}")
            if trained["status"] not in ("completed", "already_complete"):      # a rerun: finished runs train nothing
                log(f"=== {run.name}: training {trained['status']} at step {trained['step']}; stopping the study "
                    "(run the same command to resume)")
                return ""
            lm = load_run(run_dir)
            one = {"seed": seed, "run_dir": run_dir, "model": lm.describe(), "train": {**trained, **_final_metrics(run_dir)},
                   "length": {}, "length_files": {}}
            if cfg.length is not None:
                for probe in study.probes(run):
                    lcfg = dataclasses.replace(cfg.length, probes=[probe])
                    samples, info = build_samples(lm.recipe, lm.tokenizer, lcfg, probe)
                    res = evaluate_length(lm.model, samples, lcfg, train_len=lm.train_len,
                                          mitigations=_mitigations_for(cfg, probe), extra_edges=sorted(extra),
                                          log=lambda m: log(f"[{run.name}] {m}"), label=probe)
                    res["input"] = info
                    ev_dir = os.path.join(out, run.name, slug(probe) + ("" if seed is None else f"-seed{seed}"))
                    files = write_length_outputs(res, ev_dir, title=f"{run.label or run.name} (trained at "
                                                                    f"{lm.train_len}), {probe}")
                    res["diagnostics"] = head_diagnostics(res, top=5)
                    res = json_ready(res)
                    _dump(os.path.join(ev_dir, "length.json"), {"model": lm.describe(), **res})
                    one["length"][probe], one["length_files"][probe] = res, files
                    done(f"length {run.name} {seed} {probe}")
            if cfg.passkey is not None:
                log(f"=== {run.name}: passkey grid {cfg.passkey.lengths} x {cfg.passkey.depths}")
                res = evaluate_passkey(lm.model, lm.tokenizer, cfg.passkey,
                                       **prompt_settings(lm.recipe, lm.tokenizer, cfg.passkey),
                                       log=lambda m: log(f"[{run.name}] {m}"), label=run.name)
                from lctrain.eval import plots
                mark, label = lm.passkey_mark()
                ev_dir = os.path.join(out, run.name)
                png = plots.passkey_heatmap(res, os.path.join(ev_dir, "passkey" + ("" if seed is None else f"-seed{seed}")
                                                              + ".png"), train_len=mark, train_label=label,
                                            title=f"{run.label or run.name}: passkey (overall {res['overall']:.2f})")
                _dump(os.path.join(ev_dir, "passkey.json" if seed is None else f"passkey-seed{seed}.json"),
                      {"model": lm.describe(), **res})
                one["passkey"], one["passkey_png"] = res, png
                done(f"passkey {run.name} {seed}")
            per_seed.append(one)
        results.append(_merge_seeds(run, per_seed))
    analysis = analyse(cfg, results)
    summary_files = _summary_plots(cfg, results, analysis, out)
    elapsed = time.perf_counter() - t_start
    machine = {"cpus": os.cpu_count(), "arch": platform.machine(), "load_start": load_start,
               "load_end": os.getloadavg()}
    _dump(os.path.join(out, "study.json"), {"study": dataclasses.asdict(cfg), "runs": results, "analysis": analysis,
                                            "summary_plots": summary_files, "seconds": elapsed, "machine": machine})
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(_report(study, results, analysis, summary_files, out, elapsed, machine))
    log(f"report: {path} ({elapsed:.0f}s)")
    return path


def _dump(path: str, obj: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# --- pooling seeds ---------------------------------------------------------------------------------

def _merge_seeds(run: StudyRun, per_seed: list[dict]) -> dict:
    """One entry per run: the first seed's model / diagnostics / plots, the length losses pooled over seeds
    (per-sample units concatenated, means recomputed) and the passkey records pooled."""
    from lctrain.eval.length import _summary
    first = per_seed[0]
    entry = {"name": run.name, "label": run.label or run.name, "set": run.set, "reference": run.reference,
             "seeds": [s["seed"] for s in per_seed], "run_dir": first["run_dir"], "model": first["model"],
             "train": first["train"], "train_by_seed": [s["train"] for s in per_seed],
             "length": {}, "length_files": first["length_files"]}
    for probe, res in first["length"].items():
        merged = dict(res)
        merged["mitigations"] = {}
        for name, m in res["mitigations"].items():
            ms = [s["length"][probe]["mitigations"][name] for s in per_seed]
            mm = dict(m)
            mm["loss_samples"] = [row for x in ms for row in x["loss_samples"]]
            mm["count_samples"] = [row for x in ms for row in x["count_samples"]]
            L = np.asarray(mm["loss_samples"]).sum(0)
            C = np.asarray(mm["count_samples"]).sum(0)
            mm["loss"] = [float(a / c) if c > 0 else None for a, c in zip(L, C)]
            mm["count"] = [int(c) for c in C]
            mm.update(_summary(mm, res["edges"], res["train_len"], res["warmup"]))
            mm["tokens_per_s"] = float(np.mean([x["tokens_per_s"] for x in ms]))
            merged["mitigations"][name] = mm
        merged["units"] = len(merged["mitigations"]["none"]["loss_samples"]) if "none" in merged["mitigations"] \
            else len(next(iter(merged["mitigations"].values()))["loss_samples"])
        entry["length"][probe] = merged
    if "passkey" in first:
        pk = dict(first["passkey"])
        pk["records"] = [{**r, "seed": s["seed"]} for s in per_seed for r in s["passkey"]["records"]]
        entry["passkey"], entry["passkey_png"] = pk, first["passkey_png"]
    return entry


# --- analysis: verdicts, sweeps, capacity ------------------------------------------------------------

def _units(res: dict, lo: int, mid: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from lctrain.eval.length import region_means
    m = res["mitigations"][next(iter(res["mitigations"]))]     # the unmitigated pass comes first
    full = {**res, **m}
    _, sw, cw = region_means(full, res["edges"], lo, mid)
    _, sb, cb = region_means(full, res["edges"], mid, hi)
    return sw, cw, sb, cb


def _rise(u, idx) -> float:
    sw, cw, sb, cb = (a[idx] for a in u)
    return float(sb.sum() / cb.sum() - sw.sum() / cw.sum())


def collapse_verdict(run_res: dict, ref_res: Optional[dict], cfg: VerdictConfig, seed: int = 0) -> dict:
    """The verdict of one run on one probe (see the module doc): statistic, bootstrap CI, verdict.

    `run_res` / `ref_res`: length results of the run and of its reference (same probe and length, bucket
    edges containing the run's warm-up and training length); `ref_res` None: the run's own rise."""
    L, w, T = run_res["train_len"], run_res["warmup"], run_res["length"]
    if not (w < L < T):
        return {"verdict": "n/a", "why": f"the probe ({T} tokens) does not reach past the training length {L}"}
    u = _units(run_res, w, L, T)
    v = _units(ref_res, w, L, T) if ref_res is not None else None
    n, m = len(u[0]), (len(v[0]) if v is not None else 0)
    point_run = _rise(u, np.arange(n))
    point_ref = _rise(v, np.arange(m)) if v is not None else 0.0
    stat = point_run - point_ref
    rng = np.random.default_rng(seed)
    boots = np.array([_rise(u, rng.integers(0, n, n)) - (_rise(v, rng.integers(0, m, m)) if v is not None else 0.0)
                      for _ in range(cfg.resamples)])
    a = (1 - cfg.confidence) / 2
    lo, hi = float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))
    verdict = "collapse" if lo > cfg.threshold else ("no collapse" if hi < cfg.threshold else "inconclusive")
    return {"statistic": stat, "ci": [lo, hi], "rise_run": point_run, "rise_reference": point_ref if v is not None else None,
            "units_run": n, "units_reference": m, "verdict": verdict, "threshold": cfg.threshold,
            "positions": {"within": [w, L], "beyond": [L, T]}}


def recall_length(acc: Sequence[float], lengths: Sequence[int], thr: float) -> Optional[float]:
    """Longest context whose accuracy, and every shorter grid length's, is >= thr, interpolated in log
    length to where the accuracy crosses thr; the last length if all pass; None if the first fails."""
    i = 0
    while i < len(acc) and acc[i] >= thr:
        i += 1
    if i == 0:
        return None
    if i == len(acc):
        return float(lengths[-1])
    a, b = acc[i - 1], acc[i]
    f = (a - thr) / (a - b) if a > b else 0.0
    return float(2 ** (math.log2(lengths[i - 1]) + f * (math.log2(lengths[i]) - math.log2(lengths[i - 1]))))


def capacity_point(passkey: dict, thr: float, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Accuracy per length with bootstrap CIs over prompts, and the recall length with its CI."""
    lengths = passkey["lengths"]
    by_len = [np.array([r["correct"] for r in passkey["records"] if r["length"] == n], dtype=float) for n in lengths]
    acc = [float(x.mean()) if x.size else 0.0 for x in by_len]
    rng = np.random.default_rng(seed)
    a = (1 - confidence) / 2
    floor = lengths[0] / 2                              # "below the grid" in the bootstrap distribution
    boots_acc = np.array([[x[rng.integers(0, x.size, x.size)].mean() if x.size else 0.0 for x in by_len]
                          for _ in range(resamples)])
    boots = np.array([recall_length(row, lengths, thr) or floor for row in boots_acc])
    rec = recall_length(acc, lengths, thr)
    return {"lengths": lengths, "accuracy": acc, "n": [int(x.size) for x in by_len],
            "accuracy_ci": [[float(np.quantile(boots_acc[:, j], a)), float(np.quantile(boots_acc[:, j], 1 - a))]
                            for j in range(len(lengths))],
            "recall": rec, "ci": [float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))],
            "censored": "above" if rec is not None and rec >= lengths[-1] else ("below" if rec is None else None),
            "_boots": boots}


def seed_recalls(passkey: dict, thr: float) -> list[Optional[float]]:
    """Each training seed's own recall length (records tagged "seed" by the study; one entry without
    tags): the spread across seeds shows how much of a difference between runs training noise explains."""
    lengths = passkey["lengths"]
    seeds = sorted({r.get("seed") for r in passkey["records"]}, key=lambda x: (x is None, x))
    out = []
    for sd in seeds:
        acc = []
        for n in lengths:
            xs = [r["correct"] for r in passkey["records"] if r["length"] == n and r.get("seed") == sd]
            acc.append(float(np.mean(xs)) if xs else 0.0)
        out.append(recall_length(acc, lengths, thr))
    return out


def fit_trend(points: list[dict], seed: int = 0) -> Optional[dict]:
    """Least squares ln(recall) = intercept + slope ln(state) over runs with a recall length; the slope's
    CI from the runs' bootstrap recall samples (needs >= 2 distinct state sizes)."""
    pts = [p for p in points if p["recall"] is not None]
    if len({p["state"] for p in pts}) < 2:
        return None
    x = np.log([p["state"] for p in pts])
    slope, intercept = np.polyfit(x, np.log([p["recall"] for p in pts]), 1)
    rng = np.random.default_rng(seed)
    n = min(len(p["_boots"]) for p in pts)
    slopes = [np.polyfit(x, np.log([p["_boots"][rng.integers(0, n)] for p in pts]), 1)[0] for _ in range(1000)]
    return {"slope": float(slope), "intercept": float(intercept),
            "slope_ci": [float(np.quantile(slopes, 0.025)), float(np.quantile(slopes, 0.975))],
            "runs": [p["name"] for p in pts]}


def analyse(cfg: StudyConfig, results: list[dict]) -> dict:
    """Verdicts per run and probe (state_collapse), sweep series, capacity points and trend."""
    out: dict = {"verdicts": [], "sweeps": {}, "capacity": None}
    by_name = {r["name"]: r for r in results}
    for r in results:
        for probe, res in r.get("length", {}).items():
            ref = by_name.get(r["reference"]) if r["reference"] else None
            ref_res = ref["length"].get(probe) if ref else None
            if ref is not None and (ref_res is None or ref_res["length"] != res["length"]):
                ref_res, note = None, f"reference {ref['name']} has no {probe} result of this length"
            else:
                note = ""
            v = collapse_verdict(res, ref_res, cfg.verdict)
            out["verdicts"].append({"run": r["name"], "label": r["label"], "probe": probe,
                                    "reference": ref["name"] if ref_res is not None else None, "note": note, **v})
            base = next(iter(res["mitigations"].values()))
            for name, m in list(res["mitigations"].items())[1:]:
                if m.get("strength") is None:
                    continue
                auto = "auto" in name
                key = f"{probe}|{r['label']}: {m['knob']}{' (auto)' if auto else ''}"
                xs, ys = out["sweeps"].setdefault(key, ([], []))
                xs.append(m["strength"])
                ys.append(m["loss_beyond_train_len"])
                out.setdefault("sweep_baselines", {}).setdefault(probe, {})[r["label"]] = base["loss_beyond_train_len"]
    for key, (xs, ys) in out["sweeps"].items():
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out["sweeps"][key] = ([xs[i] for i in order], [ys[i] for i in order])
    with_pk = [r for r in results if "passkey" in r]
    if with_pk and cfg.kind == "state_capacity":
        points = []
        for r in with_pk:
            cp = capacity_point(r["passkey"], cfg.capacity.accuracy)
            points.append({"name": r["name"], "label": r["label"], "state": r["model"]["state_elements"], **cp,
                           "recall_by_seed": seed_recalls(r["passkey"], cfg.capacity.accuracy)})
        trend = fit_trend(points)
        ordered = sorted(points, key=lambda p: p["state"])
        recs = [p["recall"] or 0.0 for p in ordered]
        out["capacity"] = {"points": [{k: v for k, v in p.items() if k != "_boots"} for p in points], "fit": trend,
                           "monotone": all(b > a for a, b in zip(recs, recs[1:])), "accuracy": cfg.capacity.accuracy}
        out["_capacity_points"] = points
    return out


def _summary_plots(cfg: StudyConfig, results: list[dict], analysis: dict, out: str) -> dict[str, str]:
    from lctrain.eval import plots
    files = {}
    probes = sorted({p for r in results for p in r.get("length", {})})
    for probe in probes:
        with_len = [r for r in results if probe in r.get("length", {})]
        curves, tls = {}, []
        for r in with_len:
            L = r["length"][probe]
            m = next(iter(L["mitigations"].values()))
            curves[f"{r['label']} (trained at {L['train_len']})"] = ([b["center"] for b in L["buckets"]], m["loss"])
            tls.append(L["train_len"])
        files[f"loss_by_run/{probe}"] = plots.loss_vs_position(
            curves, os.path.join(out, f"loss_by_run_{plots.slug(probe)}.png"), train_lens=tls,
            title=f"per-position loss on {probe}, no mitigation")
        series = {k.split("|", 1)[1]: v for k, v in analysis["sweeps"].items() if k.split("|", 1)[0] == probe}
        if series:
            files[f"sweep/{probe}"] = plots.strength_sweep(
                series, os.path.join(out, f"sweep_{plots.slug(probe)}.png"),
                baseline=analysis.get("sweep_baselines", {}).get(probe, {}),
                title=f"mitigation strength vs loss beyond the training length ({probe})")
    if analysis.get("_capacity_points"):
        files["recall_vs_state"] = plots.recall_vs_state(analysis["_capacity_points"], analysis["capacity"]["fit"],
                                                         os.path.join(out, "recall_vs_state.png"),
                                                         title=f"max recall length (passkey accuracy >= "
                                                               f"{analysis['capacity']['accuracy']}) vs state size")
    analysis.pop("_capacity_points", None)
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


# --- the report ------------------------------------------------------------------------------------

def _f(x, nd=3) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _rel(path: str, out: str) -> str:
    return os.path.relpath(path, out)


def _signed(x) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _ci(ci, nd=2) -> str:
    return f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _report(study: Study, results: list[dict], analysis: dict, summary: dict, out: str, elapsed: float,
            machine: dict) -> str:
    cfg = study.config
    L = []
    L.append(f"# Study: {cfg.name} ({cfg.kind.replace('_', ' ')})\n")
    if cfg.description:
        L.append(cfg.description.strip() + "\n")
    load = f"load average {machine['load_start'][0]:.1f} at the start, {machine['load_end'][0]:.1f} at the end"
    L.append(f"Command: `lctrain eval study {study.path}` — base recipe `{os.path.relpath(study.base_path)}`"
             f"{' with ' + ', '.join(f'`{s}`' for s in cfg.set) if cfg.set else ''}. "
             f"Total wall time {elapsed / 60:.1f} min on {machine['cpus']} CPU core(s) ({machine['arch']}; {load}; "
             f"runs already trained are not trained again).\n")
    L.append("## Runs\n")
    L.append("| run | overrides | seeds | params | recurrent state (elements) | train len | steps | tokens | final loss | val loss | train time |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m, t = r["model"], r["train"]
        tl = str(m["train_len"]) + (f" (passkey docs ≤ {m['passkey_train_len']})" if m.get("passkey_train_len") else "")
        tok = f"{t['tokens']:,}" if isinstance(t.get("tokens"), int) else "n/a"
        seeds = ", ".join("recipe" if s is None else str(s) for s in r["seeds"])
        secs = sum(x.get("seconds") or 0 for x in r["train_by_seed"])
        L.append(f"| {r['label']} | {' '.join(f'`{s}`' for s in r['set']) or '—'} | {seeds} | {m['params']:,} | "
                 f"{m['state_elements']:,} | {tl} | {t['step']} | {tok} | "
                 f"{_f(t.get('final_loss'))} | {_f(t.get('final_val_loss'))} | {secs / 60:.1f} min |")
    L.append("")
    if analysis["verdicts"]:
        L.extend(_collapse_section(cfg, results, analysis, summary, out))
    if analysis.get("capacity"):
        L.extend(_capacity_section(cfg, results, analysis, summary, out))
    elif any("passkey" in r for r in results):
        L.extend(_passkey_table(results, summary, out))
    L.append("---\nGenerated by `lctrain eval study`; all numbers are in `study.json`.\n")
    return "\n".join(L)


def _collapse_section(cfg, results, analysis, summary, out) -> list[str]:
    V = cfg.verdict
    L = ["## Verdicts\n",
         f"Criterion: rise = mean loss over positions [L, T) minus mean loss over [warmup, L) (L: the run's training "
         f"length; the first warm-up positions are excluded); with a reference run (the long-trained twin) the "
         f"statistic is the run's rise minus the reference's loss change over the *same* positions. **collapse** when "
         f"the lower end of the {100 * V.confidence:.0f}% bootstrap CI ({V.resamples} resamples of the evaluation units "
         f"— samples × seeds — of each run) exceeds {V.threshold} nats; **no collapse** when the upper end is below "
         f"it; otherwise inconclusive. A deterministic probe with one seed has one unit: its CI is the point.\n",
         "| run | probe | reference | loss within [w, L) | loss beyond [L, T) | rise | reference change | statistic [CI] | units | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["name"], p): res for r in results for p, res in r.get("length", {}).items()}
    for v in analysis["verdicts"]:
        res = by[(v["run"], v["probe"])]
        base = next(iter(res["mitigations"].values()))
        if v["verdict"] == "n/a":
            L.append(f"| {v['label']} | {v['probe']} | — | | | | | | | n/a ({v['why']}) |")
            continue
        w0, w1 = v["positions"]["within"]
        L.append(f"| {v['label']} | {v['probe']} | {v['reference'] or '— (own rise)'} | {_f(base['loss_within_train_len'])} "
                 f"({w0}–{w1}) | {_f(base['loss_beyond_train_len'])} | {v['rise_run']:+.3f} | "
                 f"{_signed(v['rise_reference'])} | "
                 f"{v['statistic']:+.3f} {_ci(v['ci'])} | {v['units_run']}"
                 f"{'' if not v['units_reference'] else ' / ' + str(v['units_reference'])} | **{v['verdict']}** |")
    L.append("")
    L.extend(_attribution(results, analysis))
    for probe in sorted({p for r in results for p in r.get("length", {})}):
        first = next(r["length"][probe] for r in results if probe in r.get("length", {}))
        inp = first.get("input", {})
        L.append(f"## Probe `{probe}`\n")
        L.append(f"{first['length']:,} tokens per sequence: {inp.get('text', '')}; {first['units']} evaluation unit(s) "
                 f"per run (samples × seeds){'; the held-out pool was cycled to reach the length' if inp.get('wrapped') else ''}. "
                 f"Loss is bucketed by position ({first['buckets_per_octave']} buckets per doubling, plus edges at every "
                 "run's warm-up and training length). Mitigations are applied at inference only; `auto` values are "
                 "resolved per run (and per head) from that run's unmitigated pass.\n")
        L.append("| run | mitigation | loss within [w, L) | loss beyond [L, T) | loss, last bucket | max head state norm | tokens/s |")
        L.append("|---|---|---|---|---|---|---|")
        for r in results:
            if probe not in r.get("length", {}):
                continue
            for name, m in r["length"][probe]["mitigations"].items():
                extra = []
                if "state_norm_cap" in m:
                    extra.append(f"cap {m['state_norm_cap']:.3g}")
                if "state_window" in m and "state_window=auto" in name:
                    extra.append(f"W = {m['state_window']}")
                if m.get("head_state_norm"):
                    caps = [x for e in m["head_state_norm"] for x in e["values"] if x is not None]
                    extra.append(f"per-head caps {min(caps):.3g}–{max(caps):.3g}" if caps else "")
                if m.get("head_decay_scale"):
                    sc = [x for e in m["head_decay_scale"] for x in e["values"] if x is not None]
                    extra.append(f"per-head scales {min(sc):.3g}–{max(sc):.3g}" if sc else "")
                ex = f" ({'; '.join(e for e in extra if e)})" if any(extra) else ""
                L.append(f"| {r['label']} | `{name}`{ex} | {_f(m['loss_within_train_len'])} | "
                         f"{_f(m['loss_beyond_train_len'])} | {_f(m['loss_last_bucket'])} | "
                         f"{_g(m.get('max_state_norm'))} | {m['tokens_per_s']:,.0f} |")
        L.append("")
        if f"loss_by_run/{probe}" in summary:
            L.append(f"![loss by run, {probe}]({_rel(summary[f'loss_by_run/{probe}'], out)})\n")
        if f"sweep/{probe}" in summary:
            L.append(f"![strength sweep, {probe}]({_rel(summary[f'sweep/{probe}'], out)})\n")
        L.append(f"### Head diagnostics on `{probe}` (unmitigated, first seed)\n")
        for r in results:
            res = r.get("length", {}).get(probe)
            if res is None or not res.get("diagnostics", {}).get("heads"):
                continue
            heads = res["diagnostics"]["heads"]
            L.append(f"**{r['label']}** — heads ranked by state-norm growth from the training length "
                     f"({res['train_len']}) to position {res['length']:,}; memory length = 1 / −mean log-decay "
                     "(tokens), mean decay = exp(mean log-decay), both over the whole probe.\n")
            L.append("| rank | layer | head | mean decay | memory (tokens) | norm at L | norm at T | growth | variance growth |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for i, h in enumerate(heads[:5]):
                L.append(f"| {i + 1} | {h['layer']} | {h['head']} | {_f(h['mean_decay'], 5)} | {_g(h['memory_tokens'])} | "
                         f"{_g(h['norm_at_train_len'])} | {_g(h['norm_at_end'])} | {_g(h['growth'])} | {_g(h['var_growth'])} |")
            mem = [h["memory_tokens"] for h in heads if h["memory_tokens"] is not None]
            if mem:
                L.append(f"\nAll {len(heads)} heads: memory length median {np.median(mem):.4g} tokens, max "
                         f"{max(mem):.4g}; {sum(m > res['train_len'] for m in mem)} head(s) remember longer than "
                         f"the training length.\n")
            files = r["length_files"].get(probe, {})
            for key in ("loss", "top_heads", "top_head_hist"):
                if key in files:
                    L.append(f"![{r['label']} {key}]({_rel(files[key], out)})")
            L.append("")
    return L


def _attribution(results, analysis) -> list[str]:
    """Plain statements read off the verdicts: which runs collapse on which probe, and what differs."""
    L = []
    probes = sorted({v["probe"] for v in analysis["verdicts"]})
    for p in probes:
        vs = [v for v in analysis["verdicts"] if v["probe"] == p and v["verdict"] != "n/a"]
        col = [v["label"] for v in vs if v["verdict"] == "collapse"]
        no = [v["label"] for v in vs if v["verdict"] == "no collapse"]
        inc = [v["label"] for v in vs if v["verdict"] == "inconclusive"]
        L.append(f"- `{p}`: collapse — {', '.join(col) or 'none'}; no collapse — {', '.join(no) or 'none'}"
                 f"{'; inconclusive — ' + ', '.join(inc) if inc else ''}.")
    by = {r["name"]: r for r in results}
    for r in results:
        if r["reference"] and r["reference"] in by:
            a, b = set(r["set"]), set(by[r["reference"]]["set"])
            L.append(f"- {r['label']} differs from its reference {by[r['reference']]['label']} by "
                     f"{', '.join(f'`{s}`' for s in sorted(a - b)) or 'nothing'}"
                     f"{' (reference: ' + ', '.join(f'`{s}`' for s in sorted(b - a)) + ')' if b - a else ''}.")
    L.append("")
    return L


def _passkey_table(results, summary, out) -> list[str]:
    with_pk = [r for r in results if "passkey" in r]
    pk = with_pk[0]["passkey"]
    L = ["## Passkey retrieval\n",
         f"{pk['samples']} random 5-digit keys per (length, depth) cell and seed, depths {pk['depths']}, greedy decoding "
         f"of {pk['max_new_tokens']} tokens, correct = first number in the output equals the key "
         f"(chance {pk['chance']:.1e}); preamble {'on' if pk['preamble'] else 'off'}; haystack: "
         + ("windows of the run's held-out text" if pk.get("haystack") == "text" else "the repeated sentences")
         + (f"; one keyed needle (\"The pass key of {{name}} is {{key}}. ...\") per {pk['needle_every']} tokens, the "
            "question names the one asked (RULER's multi-key needle-in-a-haystack)" if pk.get("needle_every") else "")
         + ".\n"]
    lengths = pk["lengths"]
    L.append("| run | recurrent state | " + " | ".join(str(n) for n in lengths) + " | overall |")
    L.append("|---|---|" + "---|" * len(lengths) + "---|")
    for r in with_pk:
        p = r["passkey"]
        L.append(f"| {r['label']} | {r['model']['state_elements']:,} | "
                 + " | ".join(f"{a:.2f}" for a in p["accuracy_by_length"]) + f" | {p['overall']:.2f} |")
    L.append("")
    if "passkey_accuracy" in summary:
        L.append(f"![passkey accuracy]({_rel(summary['passkey_accuracy'], out)})\n")
    for r in with_pk:
        L.append(f"![{r['label']} passkey]({_rel(r['passkey_png'], out)})")
    L.append("")
    return L


def _capacity_section(cfg, results, analysis, summary, out) -> list[str]:
    cap = analysis["capacity"]
    pts = cap["points"]
    lengths = pts[0]["lengths"]
    thr = cap["accuracy"]
    L = ["## State capacity\n",
         f"Max recall length = the longest context whose passkey accuracy (over depths × samples × seeds), and every "
         f"shorter grid length's, is ≥ {thr}, interpolated in log length between the last passing and the first "
         f"failing grid length; 95% CI from 2000 bootstrap resamples of the prompts of each length. A recall "
         f"length equal to the longest grid length ({lengths[-1]}) is censored (it may be longer).\n",
         "| run | recurrent state | " + " | ".join(str(n) for n in lengths) + " | max recall length [95% CI] | per seed |",
         "|---|---|" + "---|" * len(lengths) + "---|---|"]
    fmt = lambda x, cens=None: ("< " + str(lengths[0]) if x is None else
                                (f"≥ {x:.0f}" if cens == "above" or x >= lengths[-1] else f"{x:.0f}"))
    for p in sorted(pts, key=lambda p: p["state"]):
        L.append(f"| {p['label']} | {p['state']:,} | " + " | ".join(f"{a:.2f}" for a in p["accuracy"])
                 + f" | {fmt(p['recall'], p['censored'])} {_ci(p['ci'], 0)} | "
                 + ", ".join(fmt(x) for x in p.get("recall_by_seed", [])) + " |")
    L.append("")
    spread = [p for p in pts if len(p.get("recall_by_seed", [])) > 1]
    if spread:
        lo = lambda p: min(x or lengths[0] / 2 for x in p["recall_by_seed"])
        hi = lambda p: max(x or lengths[0] / 2 for x in p["recall_by_seed"])
        overlap = any(lo(a) <= hi(b) and lo(b) <= hi(a) for i, a in enumerate(spread) for b in spread[i + 1:])
        L.append(f"Seeds: the per-seed recall lengths of different state sizes {'overlap' if overlap else 'do not overlap'}"
                 + (" — training noise is as large as the differences between sizes." if overlap else ".") + "\n")
    fit = cap["fit"]
    if fit:
        L.append(f"Fit over {', '.join(fit['runs'])}: recall length ∝ state^{fit['slope']:.2f} (95% CI of the slope "
                 f"{_ci(fit['slope_ci'])}). Recall length {'grows' if cap['monotone'] else 'does not grow'} "
                 f"monotonically with state size across the runs.\n")
    else:
        L.append("No trend fitted: fewer than two state sizes have a recall length within the grid.\n")
    if "recall_vs_state" in summary:
        L.append(f"![recall vs state]({_rel(summary['recall_vs_state'], out)})\n")
    if "passkey_accuracy" in summary:
        L.append(f"![passkey accuracy]({_rel(summary['passkey_accuracy'], out)})\n")
    for r in results:
        if "passkey_png" in r:
            L.append(f"![{r['label']} passkey]({_rel(r['passkey_png'], out)})")
    L.append("")
    return L


# --- lctrain info STUDY ----------------------------------------------------------------------------

def is_study_file(path: str) -> bool:
    """A YAML mapping with `kind` and `runs` at the top level (a training recipe has neither)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "runs" in raw and "kind" in raw


def describe_study(path: str, overrides: Optional[list[str]] = None) -> str:
    """`lctrain info STUDY`: the study's runs (overrides, train length, steps, tokens, state size, params)
    and what it evaluates, without training or allocating weights."""
    import torch
    from lctrain.models import build_model
    study = load_study(path, overrides)
    cfg = study.config
    L = [f"study       {cfg.name} ({cfg.kind}) from {path}; base recipe {os.path.relpath(study.base_path)}"]
    if cfg.description:
        L.append("            " + " ".join(cfg.description.split()))
    seeds = study.seeds()
    L.append(f"seeds       {', '.join('recipe' if s is None else str(s) for s in seeds)}"
             + (f"; {cfg.jobs} runs trained at once" if cfg.jobs > 1 else ""))
    L.append(f"{'run':<16}{'train len':>10}{'steps':>7}{'tokens':>12}{'state':>10}{'params':>11}  overrides")
    for run in cfg.runs:
        r = study.recipe(run)
        if not r.model.vocab_size:
            r.model.vocab_size = r.tokenizer.vocab_size
        with torch.device("meta"):
            model = build_model(r.model)
        info = model.summary(r.train.seq_len)
        tokens = r.train.steps * r.train.batch_size * r.train.grad_accum * r.train.seq_len
        ref = f"  (verdict vs {run.reference})" if run.reference else ""
        L.append(f"{run.name:<16}{r.train.seq_len:>10}{r.train.steps:>7}{tokens:>12,}{info['state_elements']:>10,}"
                 f"{info['params']:>11,}  {' '.join(run.set) or '-'}{ref}")
    if cfg.length is not None:
        lc = cfg.length
        probes = sorted({p for run in cfg.runs for p in study.probes(run)})
        L.append(f"length      {lc.length:,} tokens x {lc.samples} samples; probes {', '.join(probes)}; "
                 f"mitigations {', '.join(lc.mitigations)}"
                 + (f" (on {', '.join(cfg.mitigation_probes)} only)" if cfg.mitigation_probes else ""))
        L.append(f"verdict     collapse if the {100 * cfg.verdict.confidence:.0f}% CI of the loss rise beyond L "
                 f"(vs the reference) is above {cfg.verdict.threshold} nats; warm-up {lc.warmup} positions excluded")
    if cfg.passkey is not None:
        pk = cfg.passkey
        r0 = study.recipe(cfg.runs[0])
        hay = pk.haystack or r0.data.passkey.haystack
        every = pk.needle_every if pk.needle_every is not None else r0.data.passkey.needle_every
        L.append(f"passkey     lengths {pk.lengths} x depths {pk.depths} x {pk.samples} samples; haystack "
                 + ("windows of held-out text" if hay == "text" else "the repeated sentences")
                 + (f"; one keyed needle per {every} tokens, the question names one" if every else "")
                 + (f"; training documents ask up to {r0.data.passkey.questions} questions" if r0.data.passkey.questions > 1 else ""))
    if cfg.kind == "state_capacity":
        L.append(f"capacity    max recall length = longest context with passkey accuracy >= {cfg.capacity.accuracy}")
    L.append(f"run it      lctrain eval study {path}   (writes {cfg.out_dir or os.path.join('runs', 'studies', cfg.name)}/report.md)")
    return "\n".join(L)
