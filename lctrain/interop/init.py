"""`train.init_from: PATH`: continued pretraining from existing weights with a fresh optimizer.

PATH is a model file (`lctrain import` writes DIR/model.safetensors; `lctrain export` writes one), an
import directory, a run directory (its latest checkpoint) or a checkpoint directory. A recipe whose
`model` section names no `arch` takes the source's model config with its own keys on top (e.g. only
`model.mixers.mamba2.dt_max`); one that names an arch is used as given. Either way the tensor shapes
must match the source's. A recipe without `tokenizer.path` uses the tokenizer the source carries (the
token ids the weights were trained on), else trains its own (whose size must fit the vocabulary).
"""
from __future__ import annotations

import os
from typing import Optional

import yaml

from lctrain.schema import ConfigError


def _model_file(path: str) -> Optional[str]:
    """The lctrain model file PATH names, or None when PATH is a run / checkpoint directory."""
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return p
    if os.path.isfile(os.path.join(p, "model.safetensors")):
        return os.path.join(p, "model.safetensors")
    return None


def _checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint dir, run dir) of a run or checkpoint directory."""
    from lctrain.train.checkpoint import CKPT_DIR, resolve_checkpoint
    ckpt = resolve_checkpoint(os.path.expanduser(path))
    parent = os.path.dirname(os.path.abspath(ckpt))
    return ckpt, (os.path.dirname(parent) if os.path.basename(parent) == CKPT_DIR else parent)


def _source_recipe(path: str) -> dict:
    from lctrain.train.checkpoint import CheckpointError
    from lctrain.train.export import _metadata
    if not os.path.exists(os.path.expanduser(path)):
        raise ConfigError("train.init_from", f"no such model file or directory: {path}")
    try:
        f = _model_file(path)
        if f is not None:
            text = _metadata(f)["recipe"]
        else:
            _, run_dir = _checkpoint(path)
            with open(os.path.join(run_dir, "recipe.yaml")) as fh:
                text = fh.read()
    except (CheckpointError, OSError) as e:
        raise ConfigError("train.init_from", str(e).splitlines()[0]) from None
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError("train.init_from", f"{path}: its recipe is not valid YAML ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model") or {}, dict):
        raise ConfigError("train.init_from", f"{path}: its recipe is not a mapping with a 'model' mapping")
    return recipe


def source_model_config(path: str) -> dict:
    """The `model` section of the source's recipe (what a recipe without one continues)."""
    model = _source_recipe(path).get("model") or {}
    if not model.get("vocab_size"):
        raise ConfigError("train.init_from", f"{path}: its recipe does not record the vocabulary size")
    return model


def source_tokenizer(path: str, dest_dir: str) -> Optional[str]:
    """Path of the tokenizer the source carries (written under `dest_dir` for model files), or None."""
    f = _model_file(path)
    if f is not None:
        import base64
        import hashlib
        from lctrain.train.export import _metadata, load_exported_tokenizer
        b64 = _metadata(f).get("tokenizer_model_b64")
        if b64 is None:
            return None
        os.makedirs(dest_dir, exist_ok=True)       # content-addressed: a file at that name is that tokenizer
        name = f"init-{hashlib.sha1(base64.b64decode(b64)).hexdigest()[:16]}.model"
        return load_exported_tokenizer(f, os.path.join(dest_dir, name)).path
    _, run_dir = _checkpoint(path)
    tok = os.path.join(run_dir, "tokenizer.model")
    return tok if os.path.isfile(tok) else None


def load_init_weights(model, path: str) -> str:
    """Copy the source's weights into `model` (same architecture); returns a description. One-line
    CheckpointError on a mismatch (first differing tensor named)."""
    from lctrain.train.checkpoint import CheckpointError, load_tensor_file
    if not os.path.exists(os.path.expanduser(path)):
        raise CheckpointError(f"train.init_from: no such model file or directory: {path}")
    f = _model_file(path)
    if f is not None:
        from lctrain.train.export import load_exported
        src_model, _ = load_exported(f)
        state, what = src_model.state_dict(), f
    else:
        ckpt, _ = _checkpoint(path)
        if not os.path.isfile(os.path.join(ckpt, "model.pt")):
            raise CheckpointError(f"train.init_from: {ckpt} has no model.pt (ZeRO shards): run `lctrain export "
                                  f"{path} --out model.safetensors` and start from that file")
        state, what = load_tensor_file(ckpt, "model.pt"), ckpt
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise CheckpointError(f"train.init_from: {what} has no tensor {k!r} (another architecture than model.*)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"train.init_from: {what}: {k} has shape {tuple(state[k].shape)}, the recipe's "
                                  f"model {tuple(v.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(f"train.init_from: {what}: tensor {extra[0]!r} has no place in the recipe's model")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()})
    return what
