"""`lctrain export RUN_OR_CKPT --out model.safetensors`: one self-contained file for evaluation.

The weights come from the checkpoint's ZeRO shards when it has them (DeepSpeed's `zero_to_fp32`
consolidation of the fp32 master weights, stage 1, 2 or 3, any world size), else from its `model.pt`.
Tied weights are stored once. The file's metadata carries everything needed to use it on one process:
the run's resolved recipe (YAML), its sentencepiece tokenizer (base64), the step and the source.

    model, recipe = load_exported("model.safetensors")      # eval mode, on cpu
    tok = load_exported_tokenizer("model.safetensors")       # lctrain.data.tokenizer.Tokenizer
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from typing import Optional

import torch

from lctrain.train import checkpoint as ckpt
from lctrain.tempfiles import pid_alive
from lctrain.train.checkpoint import CheckpointError

FORMAT = "lctrain-model/1"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _run_dir_of(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == ckpt.CKPT_DIR else parent


def _model_skeleton(recipe_yaml: str, vocab_size: int):
    """The recipe (tokenizer path cleared: the tokenizer travels with the model) and an empty model."""
    import yaml
    from lctrain.config import recipe_from_dict
    from lctrain.models import build_model
    recipe = recipe_from_dict(yaml.safe_load(recipe_yaml) or {}, ["tokenizer.path=null"])
    recipe.model.vocab_size = vocab_size
    return recipe, build_model(recipe.model)


def _consolidated_weights(ckpt_dir: str) -> tuple[dict, str]:
    from lctrain.train.zero import ZERO_DIR
    if os.path.isdir(os.path.join(ckpt_dir, ZERO_DIR)):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=ZERO_DIR)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {ckpt_dir}: cannot consolidate its ZeRO shards ({first})") from None
        return dict(sd), "zero shards"
    sd = ckpt.load_tensor_file(ckpt_dir, "model.pt")
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: model.pt is not a state dict")
    return sd, "model.pt"


def export(path: str, out: str, dtype: str = "fp32") -> dict:
    """Write the model of run dir / checkpoint `path` to `out` (safetensors); returns a summary."""
    from safetensors.torch import save_file
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"no such run or checkpoint directory: {path}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"--out: directory {out_dir} does not exist")
    ckpt_dir = ckpt.resolve_checkpoint(path)
    run_dir = _run_dir_of(ckpt_dir)
    recipe_path = os.path.join(run_dir, "recipe.yaml")
    tok_path = os.path.join(run_dir, "tokenizer.model")
    for f, what in ((recipe_path, "recipe.yaml"), (tok_path, "tokenizer.model")):
        if not os.path.isfile(f):
            raise CheckpointError(f"checkpoint {ckpt_dir}: no {what} in its run directory {run_dir}")
    with open(recipe_path) as f:
        recipe_yaml = f.read()
    with open(tok_path, "rb") as f:
        tok_bytes = f.read()
    sd, source = _consolidated_weights(ckpt_dir)
    if "embed.weight" not in sd:
        raise CheckpointError(f"checkpoint {ckpt_dir}: its weights are not a language model's (no embed.weight)")
    recipe, model = _model_skeleton(recipe_yaml, int(sd["embed.weight"].shape[0]))
    canon = {id(p): n for n, p in model.named_parameters()}
    alias = {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    expected = set(model.state_dict().keys())
    missing = sorted(k for k in expected if k not in sd and not (k in alias and alias[k] in sd))
    extra = sorted(k for k in sd if k not in expected)
    if missing or extra:
        raise CheckpointError(f"checkpoint {ckpt_dir}: weights do not match the run's recipe "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    tensors = {}
    for k in model.state_dict().keys():
        if k in alias and alias[k] != k:
            continue                                  # a tied alias: stored once, under its canonical name
        tensors[k] = sd[k].detach().to("cpu", _DTYPES[dtype] if sd[k].is_floating_point() else sd[k].dtype).contiguous()
    state = ckpt.read_state(ckpt_dir)
    meta = {"format": FORMAT, "recipe": recipe_yaml, "tokenizer_model_b64": base64.b64encode(tok_bytes).decode(),
            "step": str(state.get("step", 0)), "source_checkpoint": os.path.abspath(ckpt_dir), "weights_from": source,
            "ties": json.dumps({k: v for k, v in alias.items() if k != v}), "dtype": dtype}
    _clean_stale_exports(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-{os.getpid()}-", dir=out_dir)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())           # like any file the user creates (mkstemp makes 0600)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n = sum(t.numel() for t in tensors.values())
    return {"out": os.path.abspath(out), "checkpoint": os.path.abspath(ckpt_dir), "step": int(state.get("step", 0)),
            "weights_from": source, "params": n, "dtype": dtype, "bytes": os.path.getsize(out)}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _clean_stale_exports(out: str):
    """Remove temp files of killed exports to the same `out` (`.NAME.tmp-PID-*` of a dead PID)."""
    d, prefix = os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-"
    for n in os.listdir(d):
        pid = n[len(prefix):].split("-", 1)[0] if n.startswith(prefix) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.remove(os.path.join(d, n))
            except OSError:
                pass


def _metadata(path: str) -> dict:
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"no such exported model: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a model exported by lctrain export (format {meta.get('format')!r})")
    if not isinstance(meta.get("recipe"), str) or not meta["recipe"]:
        raise CheckpointError(f"{path}: metadata field 'recipe' is missing")
    if not str(meta.get("step", "0")).isdigit():
        raise CheckpointError(f"{path}: metadata field 'step' must be an integer >= 0, got {meta.get('step')!r}")
    try:       # optional: `lctrain import` of a checkpoint without a sentencepiece model writes none
        if "tokenizer_model_b64" in meta:
            base64.b64decode(meta["tokenizer_model_b64"], validate=True)
            if not meta["tokenizer_model_b64"]:
                raise ValueError
    except ValueError:
        raise CheckpointError(f"{path}: metadata field 'tokenizer_model_b64' is not base64") from None
    try:
        ties = json.loads(meta.get("ties", "{}"))
    except ValueError:
        ties = None
    if not (isinstance(ties, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items())):
        raise CheckpointError(f"{path}: metadata field 'ties' must be a JSON object of name -> name")
    return meta


def load_exported(path: str, device: str = "cpu"):
    """(model in eval mode on `device`, resolved recipe) from a file written by `export`."""
    from safetensors.torch import load_file
    meta = _metadata(path)
    tensors = load_file(path)
    recipe, model = _model_skeleton(meta["recipe"], int(tensors["embed.weight"].shape[0]))
    for alias, name in json.loads(meta.get("ties", "{}")).items():
        tensors[alias] = tensors[name]
    dtype = next(iter(model.parameters())).dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    return model.to(device).eval(), recipe


def load_exported_tokenizer(path: str, dest: Optional[str] = None):
    """The tokenizer stored in an exported model, written to `dest` (default: a file named by its
    sha256 in the user's lctrain cache, `$LCTRAIN_CACHE` or ~/.cache/lctrain, reused only when its
    bytes hash to that name: a file planted there is never trusted)."""
    from lctrain.data.tokenizer import Tokenizer, TokenizerError
    meta = _metadata(path)
    if "tokenizer_model_b64" not in meta:     # e.g. `lctrain import` of a checkpoint without a sentencepiece model
        raise TokenizerError(f"tokenizer: {path} carries no tokenizer; pass --tokenizer FILE.model")
    raw = base64.b64decode(meta["tokenizer_model_b64"])
    digest = hashlib.sha256(raw).hexdigest()
    if dest is None:
        root = os.path.expanduser(os.environ.get("LCTRAIN_CACHE", "~/.cache/lctrain"))
        dest = os.path.join(root, "tokenizers", f"exported-{digest[:32]}.model")
    if not (os.path.isfile(dest) and ckpt.file_sha256(dest) == digest):
        d = os.path.dirname(os.path.abspath(dest))
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer.tmp-", dir=d)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    return Tokenizer(dest)


def export_hf(path: str, out: str) -> dict:
    """`--format hf`: the model of a run dir / checkpoint / model file (lctrain export or import) as a
    transformers directory `out` (lctrain/interop/hf.py), with its tokenizer when it has one."""
    from lctrain.interop.hf import export_hf as write_hf
    if not path or not os.path.exists(path):
        raise CheckpointError(f"no such run, checkpoint directory or model file: {path}")
    with tempfile.TemporaryDirectory(prefix="lctrain-export-") as work:     # private (mode 0700)
        model_file = path
        if os.path.isdir(path):
            model_file = os.path.join(work, "model.safetensors")
            export(path, model_file)
        model, recipe = load_exported(model_file)
        tok_path = None
        if "tokenizer_model_b64" in _metadata(model_file):
            tok_path = load_exported_tokenizer(model_file, os.path.join(work, "tokenizer.model")).path
        summary = write_hf(model, tok_path, out)
    return {**summary, "source": os.path.abspath(path)}


def cmd_export(args) -> int:
    if getattr(args, "format", "lctrain") == "hf":
        print(json.dumps(export_hf(args.path, args.out)))
        sys.stdout.flush()
        return 0
    summary = export(args.path, args.out, args.dtype)
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run's model as one safetensors file (recipe + tokenizer inside)",
                              description="Consolidate a checkpoint (ZeRO shards or plain) into one safetensors file "
                                          "that lctrain.train.export.load_exported loads on one process.")
    p.add_argument("path", metavar="RUN_OR_CKPT", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors (--format hf: a new directory)")
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="weight dtype in the file (default fp32)")
    p.add_argument("--format", default="lctrain", choices=["lctrain", "hf"],
                   help="lctrain: one safetensors file (default); hf: a transformers directory (--out DIR) that "
                        "AutoModelForCausalLM / AutoTokenizer load (mamba2 and transformer archs); RUN_OR_CKPT may "
                        "then also be a model file from lctrain export or lctrain import")
    p.set_defaults(fn=cmd_export)
