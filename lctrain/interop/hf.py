"""Hugging Face / mamba_ssm checkpoints <-> lctrain models: `lctrain import` and `lctrain export --format hf`.

Source layouts read (a local directory: `config.json` + `model.safetensors` / `pytorch_model.bin`, sharded
`*.index.json` variants too; `.bin` files only through `torch.load(weights_only=True)`):
- transformers `Mamba2ForCausalLM` (transformers/models/mamba2): `backbone.embeddings`, `backbone.layers.i.
  {norm, mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}}`, `backbone.norm_f`, `lm_head`.
- mamba_ssm `MambaLMHeadModel` with `ssm_cfg.layer: Mamba2` (mamba_ssm/models/mixer_seq_simple.py,
  mamba_ssm/modules/mamba2.py): the same names with `backbone.embedding`; its config.json is
  `{d_model, n_layer, vocab_size, ssm_cfg, rms_norm, tie_embeddings, ...}`; the vocabulary may be padded
  (`pad_vocab_size_multiple`): the embedding's rows are the model's vocabulary.
- transformers `LlamaForCausalLM` (transformers/models/llama): `model.embed_tokens`, `model.layers.i.
  {input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`,
  `model.norm`, `lm_head`.

The math is the same as lctrain's Mamba-2 (models/mamba2.py) and Transformer (models/attention.py):
in_proj order [z, x, B, C, dt]; depthwise causal conv + SiLU on xBC; dt = softplus(dt + dt_bias) with
no clamp; A = -exp(A_log); D per head; gated RMSNorm norm(y * silu(z)) over groups of d_inner / ngroups
channels (norm_before_gate = False), one eps for every norm; rotate-half RoPE with the default
frequencies (base = rope_theta), GQA by repeating kv heads, SwiGLU silu(gate) * up. Every config field is
either mapped, required to have the value lctrain implements, or known not to change the forward pass
(initialisation ranges, kernel chunk sizes, token ids); any other field or value fails with one line
naming it (`InteropError`).
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
from typing import Any, Callable, Optional

import torch

from lctrain.tempfiles import clean_dead_temps, temp_path

FIELD_IGNORED = {   # bookkeeping of transformers' PreTrainedConfig, generation defaults, token ids
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range",
    "tokenizer_class", "auto_map", "_attn_implementation_autoset", "_attn_implementation"}


class InteropError(ValueError):
    """A checkpoint or config lctrain cannot represent exactly; the message names the file and field."""


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise InteropError("Hugging Face import/export needs transformers: pip install 'lctrain[hf]'") from None
    return transformers


# --- reading a source directory -----------------------------------------------------------------------

def read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise InteropError(f"import: {src} has no config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"import: {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"import: {path} must hold a JSON object")
    return cfg


def detect_layout(cfg: dict, src: str) -> str:
    """'hf-mamba2', 'mamba_ssm' or 'hf-llama'."""
    mt = cfg.get("model_type")
    if mt == "mamba2":
        return "hf-mamba2"
    if mt == "llama":
        return "hf-llama"
    if mt is None and "ssm_cfg" in cfg and "d_model" in cfg:
        return "mamba_ssm"
    raise InteropError(f"import: {src}/config.json: model_type={mt!r} is not supported "
                       "(transformers mamba2 or llama, or a mamba_ssm Mamba-2 config)")


def _load_bin(path: str) -> dict:
    try:   # never unpickle code: tensors and plain containers only
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"import: {path}: not loadable as plain tensors with weights_only=True ({first[:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InteropError(f"import: {path} is not a state dict of tensors")
    return sd


def _load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise InteropError(f"import: {path}: no such file")
    try:
        return load_file(path)
    except Exception as e:
        raise InteropError(f"import: {path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None


def load_weights(src: str) -> dict[str, torch.Tensor]:
    """The source's state dict: safetensors preferred, else pytorch_model.bin (weights_only); shards
    merged (their files must lie in `src`). InteropError naming the file for anything unreadable."""
    for index, loader in (("model.safetensors.index.json", _load_safetensors), ("pytorch_model.bin.index.json", _load_bin)):
        p = os.path.join(src, index)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    weight_map = json.load(f).get("weight_map")
                files = sorted(set(weight_map.values()))
            except (ValueError, AttributeError, TypeError) as e:
                raise InteropError(f"import: {p}: not a shard index (a JSON object with a weight_map: {e})") from None
            sd: dict = {}
            for name in files:
                if not isinstance(name, str) or os.path.basename(name) != name:
                    raise InteropError(f"import: {p}: shard {name!r} is not a file name in {src}")
                sd.update(loader(os.path.join(src, name)))
            return sd
    st = os.path.join(src, "model.safetensors")
    if os.path.isfile(st):
        return _load_safetensors(st)
    binp = os.path.join(src, "pytorch_model.bin")
    if os.path.isfile(binp):
        return _load_bin(binp)
    raise InteropError(f"import: {src} has no model.safetensors or pytorch_model.bin")


# --- config translation ---------------------------------------------------------------------------------

def _check_fields(cfg: dict, where: str, mapped: set, required: dict[str, tuple[Callable[[Any], bool], str]],
                  ignored: set = frozenset()):
    """Every field is mapped, ignored (does not change the forward pass), or required to pass a check."""
    for k, v in cfg.items():
        if k in mapped or k in ignored or k in FIELD_IGNORED:
            continue
        if k in required:
            ok, what = required[k]
            if not ok(v):
                raise InteropError(f"{where}: {k}={v!r} is not supported by lctrain (needs {what})")
            continue
        raise InteropError(f"{where}: field {k!r} is not supported by lctrain's import (unknown to it; refusing "
                           "rather than ignoring what may change the model)")


def _num(v) -> float:
    """A JSON number; transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _dt_limit_ok(v) -> bool:
    try:
        return v is None or (len(v) == 2 and _num(v[0]) == 0.0 and math.isinf(_num(v[1])) and _num(v[1]) > 0)
    except (TypeError, ValueError):
        return False


def _mamba2_model(d_model, n_layers, vocab, tie, eps, d_state, headdim, expand, ngroups, d_conv, conv_bias,
                  dt_min=1e-3, dt_max=0.1, dt_floor=1e-4, a_range=(1.0, 16.0)) -> dict:
    return {"arch": "mamba2", "vocab_size": int(vocab), "d_model": int(d_model), "n_layers": int(n_layers),
            "pattern": "M", "ffn_pattern": "-", "tie_embeddings": bool(tie), "norm_eps": float(eps),
            "mixers": {"mamba2": {"d_state": int(d_state), "headdim": int(headdim), "expand": int(expand),
                                  "ngroups": int(ngroups), "d_conv": int(d_conv), "conv_bias": bool(conv_bias),
                                  "dt_min": float(dt_min), "dt_max": float(dt_max), "dt_init_floor": float(dt_floor),
                                  "A_init_range": [float(a) for a in a_range]}}}


def hf_mamba2_model(cfg: dict, vocab: int, where: str) -> dict:
    _check_fields(cfg, where, mapped={
        "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "head_dim", "expand", "n_groups", "conv_kernel",
        "use_conv_bias", "layer_norm_epsilon", "tie_word_embeddings", "num_heads", "time_step_min", "time_step_max",
        "time_step_floor"},
        required={"use_bias": (lambda v: not v, "use_bias=false: lctrain's projections have no bias"),
                  "hidden_act": (lambda v: v == "silu", "silu"),
                  "time_step_limit": (_dt_limit_ok, "[0.0, inf]: lctrain does not clamp dt"),
                  "rms_norm": (lambda v: v is True, "RMSNorm"),
                  "norm_before_gate": (lambda v: v is False, "the gate before the norm, as transformers computes")},
        ignored={"residual_in_fp32", "time_step_rank", "rescale_prenorm_residual", "chunk_size",
                 "max_position_embeddings"})
    d, e, hd = int(cfg.get("hidden_size", 4096)), int(cfg.get("expand", 2)), int(cfg.get("head_dim", 64))
    if "num_heads" in cfg and int(cfg["num_heads"]) * hd != e * d:
        raise InteropError(f"{where}: num_heads={cfg['num_heads']} x head_dim={hd} must equal expand x hidden_size = {e * d}")
    return _mamba2_model(d, cfg.get("num_hidden_layers", 64), vocab, cfg.get("tie_word_embeddings", False),
                         cfg.get("layer_norm_epsilon", 1e-5), cfg.get("state_size", 128), hd, e, cfg.get("n_groups", 8),
                         cfg.get("conv_kernel", 4), cfg.get("use_conv_bias", True), cfg.get("time_step_min", 1e-3),
                         cfg.get("time_step_max", 0.1), cfg.get("time_step_floor", 1e-4))


def mamba_ssm_model(cfg: dict, vocab: int, where: str) -> dict:
    """mamba_ssm's MambaConfig (models/config_mamba.py) with a Mamba2 ssm_cfg (modules/mamba2.py defaults)."""
    _check_fields(cfg, where, mapped={"d_model", "n_layer", "vocab_size", "ssm_cfg", "tie_embeddings"},
                  required={"d_intermediate": (lambda v: v == 0, "0: no MLP blocks"),
                            "attn_layer_idx": (lambda v: not v, "no attention layers"),
                            "attn_cfg": (lambda v: not v, "no attention layers"),
                            "rms_norm": (lambda v: v is True, "RMSNorm")},
                  ignored={"residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple"})
    s = cfg.get("ssm_cfg") or {}
    if not isinstance(s, dict):
        raise InteropError(f"{where}: ssm_cfg must be an object")
    where_s = f"{where}: ssm_cfg"
    _check_fields(s, where_s, mapped={"d_state", "d_conv", "expand", "headdim", "ngroups", "conv_bias", "dt_min", "dt_max",
                                      "dt_init_floor", "A_init_range"},
                  required={"layer": (lambda v: v == "Mamba2", "Mamba2 (mamba_ssm's default is Mamba1)"),
                            "d_ssm": (lambda v: v is None or int(v) == int(s.get("expand", 2)) * int(cfg["d_model"]),
                                      "the SSM over all of expand x d_model"),
                            "D_has_hdim": (lambda v: not v, "one D per head"),
                            "rmsnorm": (lambda v: v is True, "the gated RMSNorm"),
                            "norm_before_gate": (lambda v: v is False, "false: norm(y * silu(z))"),
                            "dt_limit": (_dt_limit_ok, "[0.0, inf]: lctrain does not clamp dt"),
                            "bias": (lambda v: not v, "false: lctrain's projections have no bias"),
                            "activation": (lambda v: v == "silu", "silu")},
                  ignored={"chunk_size", "use_mem_eff_path", "conv_init", "dt_init", "dt_scale", "dt_rank",
                           "process_group", "sequence_parallel"})
    if "layer" not in s:
        raise InteropError(f"{where_s}: field 'layer' is missing: mamba_ssm then builds Mamba1, which lctrain does not import")
    return _mamba2_model(cfg["d_model"], cfg["n_layer"], vocab, cfg.get("tie_embeddings", True), 1e-5,
                         s.get("d_state", 128), s.get("headdim", 64), s.get("expand", 2), s.get("ngroups", 1),
                         s.get("d_conv", 4), s.get("conv_bias", True), s.get("dt_min", 1e-3), s.get("dt_max", 0.1),
                         s.get("dt_init_floor", 1e-4), s.get("A_init_range", (1.0, 16.0)))


def _rope_theta(cfg: dict, where: str) -> float:
    rp = cfg.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            raise InteropError(f"{where}: rope_parameters must be an object")
        for k, v in rp.items():
            if k == "rope_type" and v != "default":
                raise InteropError(f"{where}: rope_parameters.rope_type={v!r} is not supported by lctrain (needs "
                                   "'default': no RoPE scaling)")
            if k not in ("rope_type", "rope_theta"):
                if k == "partial_rotary_factor" and float(v) == 1.0:
                    continue
                raise InteropError(f"{where}: rope_parameters.{k} is not supported by lctrain (default RoPE only)")
        return float(rp.get("rope_theta", 10000.0))
    return float(cfg.get("rope_theta", 10000.0))


def hf_llama_model(cfg: dict, vocab: int, where: str) -> dict:
    from lctrain.models.layers import swiglu_hidden
    _check_fields(cfg, where, mapped={
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_theta",
        "max_position_embeddings"},
        required={"hidden_act": (lambda v: v == "silu", "silu"),
                  "attention_bias": (lambda v: not v, "false: lctrain's projections have no bias"),
                  "mlp_bias": (lambda v: not v, "false: lctrain's projections have no bias"),
                  "attention_dropout": (lambda v: not v, "0.0: lctrain has no dropout"),
                  "rope_scaling": (lambda v: v is None, "null: default RoPE only")},
        ignored={"pretraining_tp"})       # a tensor-parallel slicing of the same matmuls
    d = int(cfg.get("hidden_size", 4096))
    heads = int(cfg.get("num_attention_heads", 32))
    head_dim = int(cfg.get("head_dim") or d // heads)
    inter = int(cfg.get("intermediate_size", 11008))
    mult = inter / d
    if swiglu_hidden(d, mult) != inter:
        raise InteropError(f"{where}: intermediate_size={inter} is not supported by lctrain (its SwiGLU width is a "
                           "multiple of 64)")
    return {"arch": "transformer", "vocab_size": int(vocab), "d_model": d, "n_layers": int(cfg.get("num_hidden_layers", 32)),
            "pattern": "A", "ffn_pattern": "S", "ffn_mult": mult, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "mixers": {"attention": {"n_heads": heads, "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
                                     "head_dim": head_dim if head_dim != d // heads else 0,
                                     "rope_base": _rope_theta(cfg, where)}}}


# --- weight names ---------------------------------------------------------------------------------------

def _mamba2_names(n_layers: int, embed: str) -> list[tuple[str, str]]:
    """(lctrain name, source name) pairs of a Mamba-2 LM; conv weights differ by a unit dim (see convert)."""
    pairs = [("embed.weight", embed), ("norm.weight", "backbone.norm_f.weight")]
    for i in range(n_layers):
        a, b = f"layers.{i}.", f"backbone.layers.{i}."
        pairs += [(a + "norm1.weight", b + "norm.weight"), (a + "mixer.in_proj.weight", b + "mixer.in_proj.weight"),
                  (a + "mixer.conv_weight", b + "mixer.conv1d.weight"), (a + "mixer.conv_bias", b + "mixer.conv1d.bias"),
                  (a + "mixer.dt_bias", b + "mixer.dt_bias"), (a + "mixer.A_log", b + "mixer.A_log"),
                  (a + "mixer.D", b + "mixer.D"), (a + "mixer.norm_weight", b + "mixer.norm.weight"),
                  (a + "mixer.out_proj.weight", b + "mixer.out_proj.weight")]
    return pairs


def _llama_names(n_layers: int) -> list[tuple[str, list[str]]]:
    pairs = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    for i in range(n_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(a + "norm1.weight", [b + "input_layernorm.weight"]),
                  (a + "mixer.qkv_proj.weight", [b + f"self_attn.{p}_proj.weight" for p in "qkv"]),
                  (a + "mixer.out_proj.weight", [b + "self_attn.o_proj.weight"]),
                  (a + "norm2.weight", [b + "post_attention_layernorm.weight"]),
                  (a + "ffn.w_gate_up.weight", [b + "mlp.gate_proj.weight", b + "mlp.up_proj.weight"]),
                  (a + "ffn.out_proj.weight", [b + "mlp.down_proj.weight"])]
    return pairs


def _name_map(layout: str, n_layers: int) -> list[tuple[str, list[str]]]:
    if layout == "hf-llama":
        return _llama_names(n_layers)
    embed = "backbone.embeddings.weight" if layout == "hf-mamba2" else "backbone.embedding.weight"
    return [(k, [v]) for k, v in _mamba2_names(n_layers, embed)]


def to_lctrain_state(layout: str, sd: dict, model_cfg: dict, where: str) -> dict[str, torch.Tensor]:
    """Source state dict -> lctrain state dict; every source tensor must be used (tied lm_head aside)."""
    if layout == "mamba_ssm" and "backbone.embedding.weight" not in sd and "backbone.embeddings.weight" in sd:
        layout = "hf-mamba2"
    out, used = {}, set()
    for ours, theirs in _name_map(layout, model_cfg["n_layers"]):
        if ours.endswith("conv_bias") and not model_cfg["mixers"]["mamba2"]["conv_bias"]:
            continue
        missing = [t for t in theirs if t not in sd]
        if missing:
            raise InteropError(f"{where}: tensor {missing[0]!r} is missing")
        t = torch.cat([sd[x] for x in theirs], 0) if len(theirs) > 1 else sd[theirs[0]]
        if ours.endswith("conv_weight"):
            t = t.squeeze(1)          # nn.Conv1d depthwise [C, 1, W] -> [C, W]
        out[ours] = t
        used.update(theirs)
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if not model_cfg["tie_embeddings"]:
            out["lm_head.weight"] = sd["lm_head.weight"]
        elif not torch.equal(sd["lm_head.weight"], out["embed.weight"]):
            raise InteropError(f"{where}: the config ties the embeddings but lm_head.weight differs from them")
    elif not model_cfg["tie_embeddings"]:
        raise InteropError(f"{where}: tensor 'lm_head.weight' is missing (embeddings are not tied)")
    extra = sorted(k for k in sd if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise InteropError(f"{where}: tensor {extra[0]!r} has no counterpart in lctrain's model")
    return out


def to_hf_state(arch: str, model) -> dict[str, torch.Tensor]:
    """lctrain model -> state dict in transformers' layout (Mamba2ForCausalLM or LlamaForCausalLM)."""
    cfg = model.config
    sd = model.state_dict()
    layout = "hf-mamba2" if arch == "mamba2" else "hf-llama"
    out = {}
    for ours, theirs in _name_map(layout, cfg.n_layers):
        if ours not in sd:
            continue
        t = sd[ours]
        if ours.endswith("conv_weight"):
            t = t.unsqueeze(1)
        if len(theirs) == 1:
            out[theirs[0]] = t
        elif ours.endswith("qkv_proj.weight"):
            m = model.layers[int(ours.split(".")[1])].mixer
            out.update(zip(theirs, t.split([m.n_heads * m.head_dim, m.n_kv * m.head_dim, m.n_kv * m.head_dim], 0)))
        else:
            out.update(zip(theirs, t.chunk(2, 0)))
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# --- lctrain model files --------------------------------------------------------------------------------

def write_model_file(model, recipe, out: str, tokenizer_bytes: Optional[bytes], source: str, weights_from: str) -> None:
    """An lctrain model file (the format of `lctrain export`: safetensors, recipe and tokenizer in the
    metadata, tied weights stored once), written atomically."""
    from safetensors.torch import save_file
    from lctrain.config import dump_recipe
    from lctrain.train.export import FORMAT
    canon = {id(p): n for n, p in model.named_parameters()}
    alias = {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
               if alias.get(k, k) == k}
    meta = {"format": FORMAT, "recipe": dump_recipe(recipe), "step": "0", "source_checkpoint": source,
            "weights_from": weights_from, "ties": json.dumps({k: v for k, v in alias.items() if k != v}),
            "dtype": "fp32"}
    if tokenizer_bytes is not None:
        meta["tokenizer_model_b64"] = base64.b64encode(tokenizer_bytes).decode()
    clean_dead_temps(os.path.dirname(os.path.abspath(out)))      # of killed imports
    tmp = temp_path(out)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tokenizer_bytes(src: str, tokenizer: Optional[str], vocab: int) -> tuple[Optional[bytes], str]:
    """A sentencepiece model to ship with the import: --tokenizer, else the source's tokenizer.model if any."""
    from lctrain.data.tokenizer import Tokenizer, TokenizerError
    path = tokenizer or os.path.join(src, "tokenizer.model")
    if not os.path.isfile(path):
        if tokenizer:
            raise InteropError(f"import: --tokenizer {tokenizer}: no such file")
        return None, "none (pass --tokenizer FILE.model, or eval --tokenizer)"
    try:
        tok = Tokenizer(path)
    except TokenizerError:
        if tokenizer:
            raise
        return None, f"none ({path} is not a sentencepiece model)"
    if tok.vocab_size > vocab:
        raise InteropError(f"import: tokenizer {path} has {tok.vocab_size} pieces, more than the model's vocabulary {vocab}")
    with open(path, "rb") as f:
        return f.read(), path


def import_checkpoint(src: str, arch: str, out: str, tokenizer: Optional[str] = None) -> dict:
    """Convert the checkpoint directory `src` into `out/model.safetensors` (lctrain model file, loadable by
    `lctrain eval` and `train.init_from`) and `out/recipe.yaml` (its recipe); `out` must not exist or be
    empty (never overwritten). Raises InteropError."""
    from lctrain.config import dump_recipe, recipe_from_dict
    from lctrain.models import build_model
    if not os.path.isdir(src):
        raise InteropError(f"import: no such directory: {src}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):   # e.g. a run dir: its recipe.yaml
        raise InteropError(f"import: --out {out} exists and is not an empty directory (never overwritten: "
                           "remove it or choose another)")
    cfg = read_config(src)
    layout = detect_layout(cfg, src)
    want = "transformer" if layout == "hf-llama" else "mamba2"
    if arch != want:
        raise InteropError(f"import: {src} holds a {layout} checkpoint: use --arch {want}")
    sd = load_weights(src)
    embed = next((sd[k] for k in ("backbone.embeddings.weight", "backbone.embedding.weight", "model.embed_tokens.weight")
                  if k in sd), None)
    if embed is None:
        raise InteropError(f"import: {src}: no embedding tensor (not a {layout} checkpoint?)")
    where = f"import: {src}/config.json"
    model_cfg = {"hf-mamba2": hf_mamba2_model, "mamba_ssm": mamba_ssm_model, "hf-llama": hf_llama_model}[layout](
        cfg, int(embed.shape[0]), where)
    raw = {"name": os.path.basename(os.path.abspath(out)), "model": model_cfg}
    if layout == "hf-llama" and cfg.get("max_position_embeddings"):
        raw["train"] = {"seq_len": int(cfg["max_position_embeddings"])}
    try:
        recipe = recipe_from_dict(raw)
    except ValueError as e:
        raise InteropError(f"{where}: {e}") from None
    state = to_lctrain_state(layout, sd, model_cfg, f"import: {src}")
    model = build_model(recipe.model)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise InteropError(f"import: {src}: weights do not match the config ({' '.join(str(e).split())[:240]})") from None
    tok_bytes, tok_from = _tokenizer_bytes(src, tokenizer, int(embed.shape[0]))
    os.makedirs(out, exist_ok=True)
    model_file = os.path.join(out, "model.safetensors")
    write_model_file(model, recipe, model_file, tok_bytes, os.path.abspath(src), f"import {layout}")
    with open(os.path.join(out, "recipe.yaml"), "w") as f:
        f.write(f"# imported from {os.path.abspath(src)} ({layout}); weights: model.safetensors\n")
        f.write(dump_recipe(recipe))
    return {"out": os.path.abspath(model_file), "layout": layout, "arch": arch, "params": model.num_params(),
            "vocab_size": int(embed.shape[0]), "tokenizer": tok_from}


# --- export ---------------------------------------------------------------------------------------------

def hf_config(model) -> Any:
    """transformers config for an lctrain Mamba-2 or Transformer model; InteropError for anything else."""
    tr = _transformers()
    c = model.config
    if c.arch == "mamba2" and set(c.pattern) == {"M"} and set(c.ffn_pattern) == {"-"}:
        m = c.mixers["mamba2"]
        return tr.Mamba2Config(
            vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers, state_size=m.d_state,
            head_dim=m.headdim, expand=m.expand, n_groups=m.ngroups, num_heads=m.expand * c.d_model // m.headdim,
            conv_kernel=m.d_conv, use_conv_bias=m.conv_bias, use_bias=False, layer_norm_epsilon=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, time_step_min=m.dt_min, time_step_max=m.dt_max,
            time_step_floor=m.dt_init_floor, residual_in_fp32=True, architectures=["Mamba2ForCausalLM"])
    if c.arch == "transformer" and set(c.pattern) == {"A"} and set(c.ffn_pattern) == {"S"}:
        a = c.mixers["attention"]
        if a.window is not None:
            raise InteropError("export --format hf: sliding-window attention has no LlamaForCausalLM equivalent")
        from lctrain.models.layers import swiglu_hidden
        head_dim = a.head_dim or c.d_model // a.n_heads
        return tr.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=swiglu_hidden(c.d_model, c.ffn_mult),
            num_hidden_layers=c.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads or a.n_heads,
            head_dim=head_dim, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_base)},
            attention_bias=False, mlp_bias=False, hidden_act="silu", architectures=["LlamaForCausalLM"])
    raise InteropError(f"export --format hf: arch {c.arch!r} (pattern {c.pattern!r}, ffn {c.ffn_pattern!r}) has no "
                       "transformers equivalent: the mamba2 and transformer archs export")


def export_hf(model, tokenizer_path: Optional[str], out: str, eod_id: Optional[int] = None) -> dict:
    """Write `out/` loadable by transformers.AutoModelForCausalLM.from_pretrained (config.json +
    model.safetensors) and AutoTokenizer (the sentencepiece model converted by transformers)."""
    tr = _transformers()
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InteropError(f"export --format hf: --out {out} exists and is not an empty directory")
    config = hf_config(model)
    hf = tr.AutoModelForCausalLM.from_config(config)
    state = to_hf_state(model.config.arch, model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InteropError(f"export --format hf: weights do not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = out.rstrip("/")
    clean_dead_temps(os.path.dirname(os.path.abspath(out)))      # of killed exports
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp)
        if tokenizer_path:
            tok = _hf_tokenizer(tokenizer_path, tmp)
            tok.save_pretrained(tmp)
        if os.path.isdir(out):
            os.rmdir(out)               # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": os.path.abspath(out), "architecture": config.architectures[0],
            "params": sum(p.numel() for p in hf.parameters()), "tokenizer": bool(tokenizer_path)}


def _hf_tokenizer(spm_path: str, workdir: str):
    """transformers' fast tokenizer built from the sentencepiece model (TokenizersBackend converts the
    proto: same pieces, byte fallback, no dummy prefix)."""
    tr = _transformers()
    import sentencepiece as spm
    shutil.copyfile(spm_path, os.path.join(workdir, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    with open(os.path.join(workdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "TokenizersBackend", "eos_token": eos, "bos_token": None,
                   "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
                   "add_bos_token": False, "add_eos_token": False}, f)
    return tr.AutoTokenizer.from_pretrained(workdir)
