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
    if text is None:
        return None
    out = []
    for part in text.replace(" ", "").split(","):
        mult = {"k": 1024, "m": 1024 ** 2}.get(part[-1:].lower(), 1)
        try:
            v = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise ConfigError(flag, f"expected comma-separated positive integers (k = 1024, m = 1024^2; e.g. "
                                    f"256,512,1k), got {text!r}") from None
        if v <= 0:
            raise ConfigError(flag, f"must be positive, got {v}")
        out.append(v)
    if not out:
        raise ConfigError(flag, "is empty")
    return out


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
    from lctrain.eval.passkey import evaluate_passkey
    lengths, depths = _ints(args.lengths, "--lengths"), _floats(args.depths, "--depths")
    for flag in ("samples", "max_new_tokens", "chunk_size"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    mit = parse_mitigation(args.mitigation or "none")
    if mit.state_norm == "auto":
        raise ConfigError("--mitigation", "state_norm=auto is resolved by `lctrain eval length`; give a number here")
    lm = _setup(args)
    cfg = lm.recipe.eval.passkey
    over = {k: v for k, v in (("lengths", lengths), ("depths", depths), ("samples", args.samples),
                              ("max_new_tokens", args.max_new_tokens), ("chunk_size", args.chunk_size),
                              ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    preamble = args.preamble if args.preamble is not None else (
        cfg.preamble if cfg.preamble is not None else lm.recipe.data.passkey.preamble)
    result = evaluate_passkey(lm.model, lm.tokenizer, cfg, preamble=preamble, knobs=mit.knobs(), log=_log(args))
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
    from lctrain.eval.length import build_samples, evaluate_length, write_length_outputs
    from lctrain.eval.mitigations import parse_mitigation
    for flag in ("length", "samples", "chunk_size", "buckets_per_octave", "train_len"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.length is not None and args.length < 2:
        raise ConfigError("--length", f"must be >= 2, got {args.length}")
    for i, m in enumerate(args.mitigation or []):
        parse_mitigation(m, "--mitigation")
    lm = _setup(args)
    cfg = lm.recipe.eval.length
    over = {k: v for k, v in (("length", args.length), ("samples", args.samples), ("source", args.source),
                              ("chunk_size", args.chunk_size), ("buckets_per_octave", args.buckets_per_octave),
                              ("seed", args.seed), ("mitigations", args.mitigation)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    samples, info = build_samples(lm.recipe, lm.tokenizer, cfg, args.text)
    train_len = args.train_len or lm.train_len
    result = evaluate_length(lm.model, samples, cfg, train_len=train_len, log=_log(args))
    result = {"model": lm.describe(), "input": info, **result}
    out = args.out or os.path.join(lm.run_dir, "eval")
    jpath = _write_json(os.path.join(out, f"{args.name}.json"), result)
    files = write_length_outputs(result, out, title=f"{lm.recipe.name} (trained at {train_len}): per-position loss")
    summary = {name: {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
                      for k in ("loss_within_train_len", "loss_beyond_train_len", "loss_last_bucket", "max_state_norm")}
               for name, r in result["mitigations"].items()}
    print(json.dumps({"length": result["length"], "train_len": train_len, "peak_rss_mb": round(result["peak_rss_bytes"] / 2 ** 20, 1),
                      "mitigations": summary, "json": jpath, "png": sorted(files.values())}))
    return 0


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
    p.add_argument("--chunk-size", type=int, help="prefill chunk in tokens (default: the recipe's eval section)")
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
    p.set_defaults(fn=cmd_passkey)

    p = _one_line_errors(sub.add_parser("length", help="per-position loss and recurrent-state statistics far beyond the training length",
                       description="State-collapse study of one model: writes OUT/length.json, OUT/length_loss.png "
                                   "and OUT/length_state_norm_<mitigation>.png."))
    _common(p, "length")
    p.add_argument("--length", type=int, help="tokens per evaluated sequence (e.g. 16384 or 1048576)")
    p.add_argument("--samples", type=int, help="sequences averaged")
    p.add_argument("--source", choices=["concat", "document"], help="concat: held-out docs joined into one stream "
                   "(default); document: the longest held-out documents")
    p.add_argument("--text", nargs="+", metavar="FILE", help="evaluate on these text files instead of held-out data")
    p.add_argument("--mitigation", action="append", metavar="SPEC",
                   help="repeatable; none | decay_scale=S | state_norm=C|auto | state_window=W, composable with "
                        "commas (e.g. decay_scale=1.5,state_window=512)")
    p.add_argument("--buckets-per-octave", type=int, help="log-spaced position buckets per doubling")
    p.add_argument("--train-len", type=int, help="training length to mark (default: the run's train.seq_len)")
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
