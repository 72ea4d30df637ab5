"""Load a trained model for evaluation from a run directory (its latest checkpoint), a checkpoint
directory or a file written by `lctrain export` (.safetensors: recipe and tokenizer inside), with the
run's resolved recipe and tokenizer (or another tokenizer file)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from lctrain.config import Recipe, load_recipe
from lctrain.data.tokenizer import Tokenizer, TokenizerError
from lctrain.models import LanguageModel, build_model
from lctrain.train.checkpoint import CKPT_DIR, CheckpointError, load_tensor_file, read_state, resolve_checkpoint


@dataclass
class LoadedModel:
    model: LanguageModel
    tokenizer: Tokenizer
    recipe: Recipe
    run_dir: str
    checkpoint: str
    step: int

    @property
    def train_len(self) -> int:
        return int(self.recipe.train.seq_len)

    @property
    def passkey_train_len(self) -> Optional[int]:
        """Longest passkey training document (tokens) if the run mixed them in, else None."""
        pk = self.recipe.data.passkey
        return int(pk.max_tokens) if pk.docs > 0 else None

    def passkey_mark(self) -> tuple[int, str]:
        """The length to mark on passkey plots and what it is."""
        if self.passkey_train_len:
            return self.passkey_train_len, "longest passkey training document"
        return self.train_len, "training length"

    def describe(self) -> dict:
        cfg = self.recipe.model
        return {"run_dir": os.path.abspath(self.run_dir), "checkpoint": os.path.abspath(self.checkpoint),
                "step": self.step, "arch": cfg.arch, "pattern": cfg.pattern, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "train_len": self.train_len, "passkey_train_len": self.passkey_train_len,
                "state_elements": self.model.state_elements(self.train_len),
                "params": self.model.num_params()}


def _run_dir_of(ckpt: str) -> str:
    parent = os.path.dirname(os.path.abspath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == CKPT_DIR else parent


def load_run(path: str, tokenizer: Optional[str] = None, device: str = "cpu") -> LoadedModel:
    """The model of a run dir (latest checkpoint) or checkpoint dir, in eval mode on `device`."""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"checkpoint: no such run or checkpoint directory: {path}")
    if not os.path.isdir(path):
        if path.endswith(".safetensors"):
            return _load_exported(path, tokenizer, device)
        raise CheckpointError(f"checkpoint: {path} is a file; give a run directory, a checkpoint directory or "
                              "a .safetensors file from lctrain export")
    ckpt = resolve_checkpoint(path)
    run_dir = _run_dir_of(ckpt)
    recipe_path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(recipe_path):
        raise CheckpointError(f"checkpoint {ckpt}: no recipe.yaml in its run directory {run_dir}")
    # the run dir carries its own tokenizer: don't require the recipe's original tokenizer path to exist
    recipe = load_recipe(recipe_path, ["tokenizer.path=null"])
    tok_path = tokenizer or os.path.join(run_dir, "tokenizer.model")
    if tokenizer is None and not os.path.isfile(tok_path):
        raise TokenizerError(f"tokenizer: the run directory {run_dir} has no tokenizer.model; pass --tokenizer")
    tok = Tokenizer(tok_path)
    if not os.path.isfile(os.path.join(ckpt, "model.pt")) and os.path.isdir(os.path.join(ckpt, "zero")):
        raise CheckpointError(f"checkpoint {ckpt} holds ZeRO shards, no model.pt: run `lctrain export {path} "
                              "--out model.safetensors` and evaluate that file")
    state = load_tensor_file(ckpt, "model.pt")
    if not isinstance(state, dict) or "embed.weight" not in state:
        raise CheckpointError(f"checkpoint {ckpt}: model.pt is not a language-model state dict")
    cfg = recipe.model
    cfg.vocab_size = int(state["embed.weight"].shape[0])
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"tokenizer: {tok_path} has {tok.vocab_size} pieces but the model's vocabulary has "
                             f"{cfg.vocab_size}: not this model's tokenizer")
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {ckpt}: weights do not match the run's recipe ({first})") from None
    step = int(read_state(ckpt).get("step", 0))
    model.to(_device(device)).eval()
    return LoadedModel(model=model, tokenizer=tok, recipe=recipe, run_dir=run_dir, checkpoint=ckpt, step=step)


def _device(device: str) -> torch.device:
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no GPU is available")
    return dev


def _load_exported(path: str, tokenizer: Optional[str], device: str) -> LoadedModel:
    from lctrain.train.export import _metadata, load_exported, load_exported_tokenizer
    model, recipe = load_exported(path)
    tok = Tokenizer(tokenizer) if tokenizer else load_exported_tokenizer(path)
    if tok.vocab_size > recipe.model.vocab_size:
        raise TokenizerError(f"tokenizer: {tok.path} has {tok.vocab_size} pieces but the model's vocabulary has "
                             f"{recipe.model.vocab_size}: not this model's tokenizer")
    step = int(_metadata(path).get("step", 0))
    return LoadedModel(model=model.to(_device(device)).eval(), tokenizer=tok, recipe=recipe,
                       run_dir=os.path.dirname(os.path.abspath(path)), checkpoint=path, step=step)
