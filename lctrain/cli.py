"""The `lctrain` command. Every user error is one line on stderr and a non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

EXIT_USAGE = 2


def _recipe_args(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.steps=100 (repeatable)")


def _load(args):
    from lctrain.config import load_recipe
    return load_recipe(args.recipe, args.overrides)


def cmd_train(args) -> int:
    from lctrain.train.trainer import train
    recipe = _load(args)
    result = train(recipe, run_dir=args.run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in ("status", "step", "loss", "val_loss", "run_dir")}))
    return 0


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
    print(json.dumps({"path": tok.path, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}))
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
    print(f"state       {info['state_elements']:,} elements per sequence after {L} tokens "
          f"({info['state_elements'] / L:,.1f} per token; recurrent layers: constant in length)")
    tokens = recipe.train.batch_size * recipe.train.grad_accum * recipe.train.seq_len
    print(f"tokens/step {tokens:,} per data-parallel rank; budget {tokens * recipe.train.steps:,} per rank")
    print("--- resolved recipe ---")
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lctrain", description="Long-context pretraining of hybrid recurrent / attention / MoE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a recipe", description="Train (or resume) a model from a recipe.")
    _recipe_args(p)
    p.add_argument("--run-dir", help="run directory (default: the recipe's run_dir, else runs/<name>)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the run dir's latest checkpoint if any (default); never; or a checkpoint path")
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
    for mod in ("lctrain.eval.cli", "lctrain.train.export"):
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
    except ConfigError as e:
        print(f"lctrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (TokenizerError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("LCTRAIN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lctrain: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lctrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
