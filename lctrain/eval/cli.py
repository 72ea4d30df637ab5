"""`lctrain eval passkey | length | study`: registered into the `lctrain` command by lctrain/cli.py.

List arguments are parsed here (not by argparse types) so that a bad value is one line
`lctrain: error: --lengths: ...` and exit status 2, like a bad recipe field.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lctrain.schema import ConfigError


def _ints(text: Optional[str], flag: str) -> Optional[list[int]]:
    from lctrain.eval.sizes import parse_sizes
    return parse_sizes(text, flag)


def _size(text: Optional[str], flag: str, minimum: int = 1) -> Optional[int]:
    from lctrain.eval.sizes import parse_size
    return None if text is None else parse_size(text, flag, minimum)


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        out = [float(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        raise ConfigError(flag, f"expected comma-separated numbers in [0, 1] (e.g. 0,0.5,1), got {text!r}") from None
    for v in out:
        if not 0.0 <= v <= 1.0:
            raise ConfigError(flag, f"must be in [0, 1], got {v}")
    return out


def _positive(v: Optional[int], flag: str) -> Optional[int]:
    if v is not None and v <= 0:
        raise ConfigError(flag, f"must be positive, got {v}")
    return v


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from lctrain.eval.loading import load_run
    return load_run(args.run, tokenizer=args.tokenizer, device=args.device)


def _log(args):
    return (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))


def _write_json(path: str, obj: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    return path


def cmd_passkey(args) -> int:
    import dataclasses
    from lctrain.eval import plots
    from lctrain.eval.mitigations import parse_mitigation
    from lctrain.eval.passkey import evaluate_passkey, prompt_settings
    lengths, depths = _ints(args.lengths, "--lengths"), _floats(args.depths, "--depths")
    args.chunk_size = _size(args.chunk_size, "--chunk-size")
    for flag in ("samples", "max_new_tokens"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    mit = parse_mitigation(args.mitigation or "none")
    if mit.needs_auto:
        raise ConfigError("--mitigation", "auto values are resolved by `lctrain eval length`; give numbers here")
    lm = _setup(args)
    cfg = lm.recipe.eval.passkey
    over = {k: v for k, v in (("lengths", lengths), ("depths", depths), ("samples", args.samples),
                              ("max_new_tokens", args.max_new_tokens), ("chunk_size", args.chunk_size),
                              ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    try:
        prompts = prompt_settings(lm.recipe, lm.tokenizer, cfg, preamble=args.preamble, haystack=args.haystack)
    except ValueError as e:
        raise ConfigError("--haystack", str(e)) from None
    result = evaluate_passkey(lm.model, lm.tokenizer, cfg, **prompts, knobs=mit.knobs(), log=_log(args))
    result = {"model": lm.describe(), "mitigation": mit.name, **result}
    out = args.out or os.path.join(lm.run_dir, "eval")
    jpath = _write_json(os.path.join(out, f"{args.name}.json"), result)
    mark, label = lm.passkey_mark()
    ppath = plots.passkey_heatmap(result, os.path.join(out, f"{args.name}.png"), train_len=mark, train_label=label,
                                  title=f"passkey: {lm.recipe.name} step {lm.step}"
                                        f"{'' if mit.neutral else ' ' + mit.name} (overall {result['overall']:.2f})")
    print(json.dumps({"overall": result["overall"], "accuracy_by_length": dict(zip(map(str, cfg.lengths),
                      [round(a, 4) for a in result["accuracy_by_length"]])), "json": jpath, "png": ppath}))
    return 0


def cmd_length(args) -> int:
    import dataclasses
    from lctrain.eval.length import (build_samples, evaluate_length, json_ready, probe_specs,
                                     write_length_outputs)
    from lctrain.eval.mitigations import parse_mitigation
    from lctrain.eval.probes import parse_probe
    args.length = _size(args.length, "--length", minimum=2)
    args.chunk_size = _size(args.chunk_size, "--chunk-size")
    args.train_len = _size(args.train_len, "--train-len")
    for flag in ("samples", "buckets_per_octave"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    for m in args.mitigation or []:
        parse_mitigation(m, "--mitigation")
    for p in args.probe or []:
        parse_probe(p, "--probe")
    if args.probe and args.text:
        raise ConfigError("--probe", "give either --probe or --text (--text FILE is the probe file:FILE)")
    lm = _setup(args)
    cfg = lm.recipe.eval.length
    over = {k: v for k, v in (("length", args.length), ("samples", args.samples), ("source", args.source),
                              ("chunk_size", args.chunk_size), ("buckets_per_octave", args.buckets_per_octave),
                              ("seed", args.seed), ("mitigations", args.mitigation), ("probes", args.probe))
            if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    train_len = args.train_len or lm.train_len
    out = args.out or os.path.join(lm.run_dir, "eval")
    probes = probe_specs(cfg, args.text)
    report = {"length": cfg.length, "train_len": train_len, "probes": {}}
    for probe in probes:
        samples, info = build_samples(lm.recipe, lm.tokenizer, cfg, probe)
        result = evaluate_length(lm.model, samples, cfg, train_len=train_len, log=_log(args), label=probe)
        pdir = out if len(probes) == 1 else os.path.join(out, _slug(probe))
        files = write_length_outputs(result, pdir, title=f"{lm.recipe.name} (trained at {train_len}), {probe}")
        result = {"model": lm.describe(), "input": info, **json_ready(result)}
        jpath = _write_json(os.path.join(pdir, f"{args.name}.json"), result)
        summary = {name: {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
                          for k in ("loss_within_train_len", "loss_beyond_train_len", "loss_last_bucket",
                                    "max_state_norm")}
                   for name, r in result["mitigations"].items()}
        report["probes"][probe] = {"mitigations": summary, "json": jpath, "png": sorted(files.values())}
        report["peak_rss_mb"] = round(result["peak_rss_bytes"] / 2 ** 20, 1)
    if len(probes) == 1:                    # one probe: the flat summary (as before probes existed)
        only = report.pop("probes")[probes[0]]
        report.update(probe=probes[0], **only)
    print(json.dumps(report))
    return 0


def _slug(name: str) -> str:
    from lctrain.eval.plots import slug
    return slug(name)


def cmd_study(args) -> int:
    from lctrain.eval.study import load_study, run_study
    study = load_study(args.study, args.overrides)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    report = run_study(study, out_dir=args.out, log=_log(args))
    if not report:
        print(json.dumps({"report": None, "status": "interrupted"}))
        return 130
    print(json.dumps({"report": report}))
    return 0


def _one_line_errors(p):
    """argparse's own errors (e.g. --length abc) as one line, like every other lctrain error."""
    import sys

    def error(message):
        print(f"lctrain: error: {message}", file=sys.stderr)
        sys.exit(2)
    p.error = error
    return p


def _common(p, name_default: str):
    p.add_argument("run", help="run directory (its latest checkpoint), checkpoint directory, or a .safetensors "
                               "file from lctrain export")
    p.add_argument("--tokenizer", help="tokenizer .model (default: the run directory's tokenizer.model)")
    p.add_argument("--out", help="output directory (default: RUN/eval; next to an exported file)")
    p.add_argument("--name", default=name_default, help=f"output file stem (default: {name_default})")
    p.add_argument("--chunk-size", help="prefill chunk in tokens, e.g. 2048 or 2k (default: the recipe's eval section)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary JSON line is still printed)")


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="long-context evaluation: passkey retrieval, length extrapolation, studies",
                               description="Long-context evaluation of a trained run.")
    sub = ev.add_subparsers(dest="eval_command", metavar="COMMAND")
    sub.required = True

    p = _one_line_errors(sub.add_parser("passkey", help="passkey retrieval accuracy over context length x needle depth",
                       description="Passkey retrieval (standard protocol): writes OUT/passkey.json and a heatmap "
                                   "OUT/passkey.png (depth x length)."))
    _common(p, "passkey")
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens, e.g. 256,512,1k,4k")
    p.add_argument("--depths", help="comma-separated needle depths in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, help="prompts (random keys) per cell")
    p.add_argument("--max-new-tokens", type=int, help="greedy decoding budget")
    p.add_argument("--mitigation", help="inference knobs, e.g. decay_scale=2 or state_window=512 (default none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preamble", dest="preamble", action="store_true", default=None,
                   help="start with the standard task description (default: as the run's data.passkey)")
    g.add_argument("--no-preamble", dest="preamble", action="store_false")
    p.add_argument("--haystack", choices=["repeat", "text"],
                   help="repeat: the standard repeated sentences; text: windows of the run's held-out text "
                        "(default: as the run's data.passkey.haystack)")
    p.set_defaults(fn=cmd_passkey)

    p = _one_line_errors(sub.add_parser("length", help="per-position loss and recurrent-state statistics far beyond the training length",
                       description="State-collapse study of one model: writes OUT/length.json, OUT/length_loss.png "
                                   "and OUT/length_state_norm_<mitigation>.png."))
    _common(p, "length")
    p.add_argument("--length", help="tokens per evaluated sequence: 16384, 16k or 1m (k = 1024, m = 1024^2)")
    p.add_argument("--samples", type=int, help="sequences averaged")
    p.add_argument("--source", choices=["concat", "document"], help="concat: held-out docs joined into one stream "
                   "(default); document: the longest held-out documents")
    p.add_argument("--text", nargs="+", metavar="FILE", help="evaluate on these text files instead of held-out data")
    p.add_argument("--probe", action="append", metavar="PROBE",
                   help="repeatable; heldout | documents | newlines[:prefix=N] | repeat[:period=N] | file:PATH "
                        "(default: the recipe's eval.length.probes, else heldout)")
    p.add_argument("--mitigation", action="append", metavar="SPEC",
                   help="repeatable; none | decay_scale=S | state_norm=C | state_window=W, each also auto or auto*x "
                        "(per head / per run), composable with commas (e.g. decay_scale=1.5,state_window=512)")
    p.add_argument("--buckets-per-octave", type=int, help="log-spaced position buckets per doubling")
    p.add_argument("--train-len", help="training length to mark, e.g. 64 or 1k (default: the run's train.seq_len)")
    p.set_defaults(fn=cmd_length)

    p = _one_line_errors(sub.add_parser("study", help="run a study recipe end to end (train, evaluate, write a markdown report)",
                       description="Run a study (recipes/studies/*.yaml): trains its runs (resuming finished ones), "
                                   "evaluates them and writes OUT/report.md with plots."))
    p.add_argument("study", help="study recipe, e.g. recipes/studies/state-collapse.yaml")
    p.add_argument("--out", help="output directory (default: the study's out_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study field, e.g. --set length.length=4096 (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_study)
