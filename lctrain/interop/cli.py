"""`lctrain import SRC --arch mamba2|transformer --out DIR` (see lctrain/interop/hf.py)."""
from __future__ import annotations

import json


def cmd_import(args) -> int:
    from lctrain.interop.hf import import_checkpoint
    print(json.dumps(import_checkpoint(args.src, args.arch, args.out, args.tokenizer)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="convert a Hugging Face / mamba_ssm checkpoint into an lctrain model",
        description="Read a local transformers Mamba2ForCausalLM or LlamaForCausalLM directory, or a mamba_ssm "
                    "Mamba-2 (config.json + model.safetensors / pytorch_model.bin), and write DIR/model.safetensors "
                    "(for lctrain eval and train.init_from) and DIR/recipe.yaml.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory (config.json + weights)")
    p.add_argument("--arch", required=True, choices=["mamba2", "transformer"], help="lctrain architecture to import into")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", metavar="FILE", help="sentencepiece .model to ship with the model "
                                                       "(default: SRC/tokenizer.model if it is one)")
    p.set_defaults(fn=cmd_import)
