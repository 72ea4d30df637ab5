"""The `lctrain` command. Every user error is one line on stderr and a non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from lctrain.schema import OneLineParser

EXIT_USAGE = 2


def _recipe_args(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.steps=100 (repeatable)")


def _load(args):
    from lctrain.config import load_recipe
    return load_recipe(args.recipe, args.overrides)


def cmd_train(args) -> int:
    """Exit status: 0 completed (or already complete); after SIGINT / SIGTERM, once the checkpoint is
    saved, 128 + the signal number (130 / 143), the shell convention for a run stopped by a signal."""
    from lctrain.train.metrics import json_line
    from lctrain.train.trainer import train
    recipe = _load(args)
    result = train(recipe, run_dir=args.run_dir, resume=args.resume, fresh=args.fresh)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json_line({k: result.get(k) for k in ("status", "step", "loss", "val_loss", "run_dir")}), flush=True)
        if result["status"] in ("completed", "already_complete"):
            _print_next_steps(result["run_dir"], recipe)
    if result["status"] == "interrupted":
        return 128 + (result.get("signal") or 2)
    return 0


def _print_next_steps(run_dir: str, recipe) -> None:
    """What a person does with a finished run: the long-context evaluations and the export."""
    import shlex
    run = shlex.quote(run_dir)
    far = 16 * recipe.train.seq_len
    print(f"next steps:\n"
          f"  lctrain eval length {run} --length {far} --samples 1   # loss + state statistics at 16x train.seq_len\n"
          f"  lctrain eval passkey {run} --lengths 256,512,1k --samples 2   # passkey retrieval "
          f"(recipes/passkey-cpu.yaml trains for it)\n"
          f"  lctrain export {run} --out {shlex.quote(os.path.join(run_dir, 'model.safetensors'))}", flush=True)


def cmd_tokenizer_train(args) -> int:
    from lctrain.data.dataset import ensure_tokenizer, tokenizer_path, tokenizer_training_texts
    recipe = _load(args)
    if args.out:
        from lctrain.data.tokenizer import train_tokenizer
        tok = train_tokenizer(tokenizer_training_texts(recipe), args.out, recipe.tokenizer.vocab_size,
                              recipe.tokenizer.train_bytes)
    else:
        if recipe.tokenizer.path:
            print(f"recipe uses an existing tokenizer: {tokenizer_path(recipe)}")
        tok = ensure_tokenizer(recipe)
    from lctrain.train.metrics import json_line
    print(json_line({"path": tok.path, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}))
    return 0


def cmd_info(args) -> int:
    import torch
    from lctrain.data.dataset import tokenizer_path
    from lctrain.data.tokenizer import Tokenizer
    from lctrain.eval.study import describe_study, is_study_file
    from lctrain.models import build_model
    if is_study_file(args.recipe):          # a study recipe (recipes/studies/*.yaml): describe its runs
        print(describe_study(args.recipe, args.overrides))
        return 0
    recipe = _load(args)
    cfg = recipe.model
    if cfg.vocab_size == 0:
        path = tokenizer_path(recipe)
        cfg.vocab_size = Tokenizer(path).vocab_size if os.path.isfile(path) else recipe.tokenizer.vocab_size
    with torch.device("meta"):
        model = build_model(cfg)
    info = model.summary(recipe.train.seq_len)
    L = recipe.train.seq_len
    print(f"model       {cfg.arch}  pattern={cfg.pattern} ffn={cfg.ffn_pattern}  layers={cfg.n_layers} d_model={cfg.d_model} vocab={cfg.vocab_size}")
    print(f"params      {info['params']:,} total, {info['non_embedding_params']:,} non-embedding, {info['active_params']:,} active per token")
    print(f"flops/token {info['flops_per_token']:.4g} (training, seq_len {L})")
    print(f"state       {_describe_state(model, L)}")
    tokens = recipe.train.batch_size * recipe.train.grad_accum * recipe.train.seq_len
    print(f"tokens/step {tokens:,} per data-parallel rank; budget {tokens * recipe.train.steps:,} per rank")
    print("--- resolved recipe ---")
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


def _describe_state(model, seq_len: int) -> str:
    """Decoding state per sequence, split into the part that is constant in length (recurrent states,
    conv tails, sliding-window caches) and the part that grows (full-attention KV caches). A layer's kind
    is read off its own `state_elements` at two long lengths, so every registered mixer is described
    truthfully without a list of letters here."""
    far = max(seq_len, 1 << 20)
    const, grow = {}, {}
    for b in model.layers:
        mixer = b.mixer
        n = mixer.state_elements(seq_len)
        kind = grow if mixer.state_elements(2 * far) != mixer.state_elements(far) else const
        kind.setdefault(mixer.letter, [0, 0])
        kind[mixer.letter][0] += 1
        kind[mixer.letter][1] += n
    letters = lambda d: " ".join(f"{k}x{v[0]}" for k, v in d.items())
    total_c, total_g = sum(v[1] for v in const.values()), sum(v[1] for v in grow.values())
    parts = []
    if const:
        parts.append(f"{total_c:,} constant in length (recurrent / windowed layers {letters(const)})")
    if grow:
        parts.append(f"{total_g:,} KV cache growing with length, {total_g / seq_len:,.1f} per token "
                     f"(attention layers {letters(grow)})")
    if not parts:
        return "none (no layer keeps decoding state)"
    return f"{total_c + total_g:,} elements per sequence after {seq_len} tokens: " + " + ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lctrain", description="Long-context pretraining of hybrid recurrent / attention / MoE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a recipe", description="Train (or resume) a model from a recipe.")
    _recipe_args(p)
    p.add_argument("--run-dir", help="run directory (default: the recipe's run_dir, else runs/<name>)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the run dir's latest checkpoint if any (default); never (refused in a dir "
                        "that already holds a run); or a checkpoint path")
    p.add_argument("--fresh", action="store_true",
                   help="start from step 0 in a used run dir: its contents are first moved to RUN/superseded/<time>/")
    p.set_defaults(fn=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    tok.required = True
    p = tok.add_parser("train", help="train the recipe's sentencepiece tokenizer on its data",
                       description="Train (or find in the cache) the recipe's BPE tokenizer.")
    _recipe_args(p)
    p.add_argument("--out", help="write the model here instead of the data cache")
    p.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("info", help="parameter counts, FLOPs per token, state size and the resolved recipe",
                       description="Describe the model a recipe builds (no weights allocated).")
    _recipe_args(p)
    p.set_defaults(fn=cmd_info)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands of other packages (eval, export) that register themselves here."""
    regs = []
    for mod in ("lctrain.eval.cli", "lctrain.train.export", "lctrain.interop.cli"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        regs.append(module.register)
    return regs


def main(argv=None) -> int:
    from lctrain.data.tokenizer import TokenizerError
    from lctrain.schema import ConfigError
    from lctrain.train.checkpoint import CheckpointError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:           # `lctrain info R | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as e:
        return report_error(f"lctrain: error: {e}", EXIT_USAGE)
    except (TokenizerError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("LCTRAIN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return report_error(f"lctrain: error: {msg}", 1)
    except KeyboardInterrupt:
        return report_error("lctrain: interrupted", 130)


def report_error(line: str, code: int) -> int:
    """Print the one-line error. A worker of `lctrain.train.launch` also hands it to the launcher
    (torchelastic's per-rank error file) and prints it only on global rank 0, so N ranks failing alike
    show one line, and the launcher ends with the first failing rank's line and a summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and os.environ.get("LCTRAIN_LAUNCHER"):
        import time
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time()), "lctrain_time": time.time()}, f)
            if os.environ.get("RANK", "0") != "0":
                return code
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
