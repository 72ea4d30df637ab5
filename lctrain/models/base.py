"""The mixer interface, the registries and the one language model every architecture is built from.

A model is a stack of pre-norm residual blocks `x += mixer(norm(x)); x += ffn(norm(x))`. The layer
pattern (one letter per layer, tiled to `n_layers`) picks each block's mixer from `MIXERS`; the
ffn pattern picks its feed-forward from `FFNS`. An architecture name (`arch`) is a preset of
defaults for this config (`ARCHS`), so Transformer, Mamba-2, GLA, BASED and hybrids are one class.

Contracts (every mixer / ffn obeys them; the trainer, parallel and eval code rely on them):
- `Mixer.forward(x [B,T,D], ctx: SeqContext, cache: dict | None) -> [B,T,D]`. With a cache dict the
  mixer continues from the state stored in it and stores its new state there (recurrent state,
  conv tail, KV cache): chunked prefill and token-by-token decoding are the same code path and
  must equal one full forward.
- All sequence mixing goes through `ctx.ops` (see seqops.py); mixers never call torch.distributed.
- `FFN.forward(x, ctx) -> [B,T,D]`; an FFN with an auxiliary loss sets `self.aux_loss` (a scalar
  tensor) on each forward and may fill `self.stats` (floats for metrics). An FFN with
  `uses_cache = True` is called as `forward(x, ctx, cache)` with its own dict (`layer_cache["ffn"]`,
  None when not decoding), for FFNs whose output depends on earlier tokens (chunk-level MoE routing).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lctrain.models.layers import RMSNorm, SwiGLU, swiglu_hidden
from lctrain.models.seqops import LOCAL_OPS, EagerOps, LocalOps
from lctrain.schema import fail, from_dict, require, suggest


@dataclass
class SeqContext:
    """What a forward pass knows about the sequence besides the activations."""
    doc_start: Optional[Tensor] = None   # [B, T] bool, True on the first token of a document
    ops: LocalOps = LOCAL_OPS            # local or sequence-parallel sequence ops
    position_offset: int = 0             # global index of token 0 (SP shard offset, decode position)
    knobs: Optional["InferenceKnobs"] = None  # inference-only state-collapse knobs (set from the cache)


@dataclass
class InferenceKnobs:
    """Training-free state-collapse mitigations, applied at inference by the recurrent mixers.

    Neutral values change nothing. See lctrain/eval for the studies that use them.
    """
    decay_scale: float = 1.0            # multiply the log-decay (Mamba-2: dt) by this
    state_norm: Optional[float] = None  # renormalise each head's state to at most this Frobenius norm
    state_window: Optional[int] = None  # sliding window via state difference: forget tokens older than W
    # per head, {(layer index, state cache key): {"decay_scale": [H] floats, "state_norm": [H] floats}}:
    # decay scales multiply `decay_scale`; caps replace `state_norm` (inf: that head uncapped)
    heads: Optional[dict] = None
    record_decay: bool = False          # accumulate each head's sum of log-decays (head diagnostics)

    def layer_entries(self) -> dict[int, dict]:
        """{layer: {"<key>.heads": {"decay_scale"|"state_norm": fp32 tensor [H]}}} for the cache dicts."""
        out: dict[int, dict] = {}
        for (layer, key), per in (self.heads or {}).items():
            out.setdefault(int(layer), {})[f"{key}.heads"] = {
                name: torch.as_tensor(vals, dtype=torch.float32) for name, vals in per.items() if vals is not None}
        return out


class InferenceCache:
    """Per-layer decoding state. `seen` is how many tokens the model has consumed."""

    def __init__(self, n_layers: int, knobs: Optional[InferenceKnobs] = None):
        self.layers: list[dict] = [dict() for _ in range(n_layers)]
        self.seen = 0
        self.knobs = knobs or InferenceKnobs()
        for i, entries in self.knobs.layer_entries().items():
            self.layers[i].update(entries)


class Mixer(nn.Module):
    """Base class for sequence mixers. Subclasses set `name`, `letter` and `Config` (a dataclass)."""
    name: str = ""
    letter: str = ""
    Config: type = None

    def __init__(self, d_model: int, config, layer_idx: int, lm: "LMConfig"):
        super().__init__()
        self.d_model, self.config, self.layer_idx = d_model, config, layer_idx

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the sequence mixing itself (not the projections' matmuls)."""
        return 0.0

    def state_elements(self, seq_len: int) -> int:
        """Elements of decoding state per sequence after `seq_len` tokens (recurrent state or KV cache)."""
        return 0


def require_head_split(cfg, lm: "LMConfig", path: str):
    """Heads of `cfg.n_heads` split d_model evenly unless `cfg.head_dim` sets their size."""
    require(cfg.head_dim > 0 or lm.d_model % cfg.n_heads == 0, f"{path}.n_heads",
            f"must divide d_model={lm.d_model} (or set head_dim)")


MIXERS: dict[str, type[Mixer]] = {}          # pattern letter -> mixer class
FFNS: dict[str, Callable] = {}               # ffn pattern letter -> builder(d_model, lm_cfg, layer_idx)
FFN_CONFIGS: dict[str, type] = {}            # ffn name -> options dataclass (e.g. "moe")
ARCHS: dict[str, dict] = {}                  # arch name -> preset of LMConfig defaults


def register_mixer(cls):
    require(cls.letter not in MIXERS, "", f"mixer letter {cls.letter!r} registered twice")
    MIXERS[cls.letter] = cls
    return cls


def register_arch(name: str, preset: dict):
    ARCHS[name] = preset


def mixer_by_name(name: str) -> type[Mixer]:
    for cls in MIXERS.values():
        if cls.name == name:
            return cls
    raise KeyError(name)


@dataclass
class LMConfig:
    arch: str = "transformer"          # preset from ARCHS that fills unspecified fields
    vocab_size: int = 0                # 0: taken from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "A"                 # mixer letter per layer, tiled to n_layers (see MIXERS)
    ffn_pattern: str = "S"             # ffn letter per layer, tiled: S = SwiGLU, - = none, E = MoE
    ffn_mult: float = 8 / 3            # SwiGLU hidden = ffn_mult * d_model, rounded up to 64
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mixers: dict[str, Any] = field(default_factory=dict)  # options per mixer name, e.g. {attention: {n_heads: 8}}
    ffns: dict[str, Any] = field(default_factory=dict)    # options per ffn name, e.g. {moe: {n_experts: 8}}

    def validate(self, path: str = ""):
        p = (lambda k: f"{path}.{k}" if path else k)
        require(self.d_model > 0, p("d_model"), f"must be positive, got {self.d_model}")
        require(self.n_layers > 0, p("n_layers"), f"must be positive, got {self.n_layers}")
        require(self.vocab_size >= 0, p("vocab_size"), f"must be >= 0, got {self.vocab_size}")
        for name, pat, table in (("pattern", self.pattern, MIXERS), ("ffn_pattern", self.ffn_pattern, FFNS)):
            require(len(pat) > 0, p(name), "must not be empty")
            require(self.n_layers % len(pat) == 0, p(name),
                    f"length {len(pat)} must divide n_layers={self.n_layers}")
            for ch in pat:
                if ch not in table:
                    fail(p(name), f"unknown letter {ch!r}; known: {''.join(sorted(table))}")
        used = {MIXERS[ch].name: MIXERS[ch] for ch in self.pattern}
        known = {cls.name: cls for cls in MIXERS.values()}
        parsed = {}
        for name, opts in self.mixers.items():
            if name not in known:
                fail(p(f"mixers.{name}"), "unknown mixer" + suggest(name, known))
            parsed[name] = from_dict(known[name].Config, opts or {}, p(f"mixers.{name}"))
        for name, cls in used.items():
            if name not in parsed:
                parsed[name] = from_dict(cls.Config, {}, p(f"mixers.{name}"))
        self.mixers = parsed
        parsed_ffn = {}
        for name, opts in self.ffns.items():
            if name not in FFN_CONFIGS:
                fail(p(f"ffns.{name}"), "unknown ffn" + suggest(name, FFN_CONFIGS))
            parsed_ffn[name] = from_dict(FFN_CONFIGS[name], opts or {}, p(f"ffns.{name}"))
        for name, cls in FFN_CONFIGS.items():
            parsed_ffn.setdefault(name, from_dict(cls, {}, p(f"ffns.{name}")))
        self.ffns = parsed_ffn
        for name, mcfg in self.mixers.items():
            if hasattr(mcfg, "check_model"):
                mcfg.check_model(self, p(f"mixers.{name}"))

    def layer_letters(self) -> list[tuple[str, str]]:
        reps_m, reps_f = self.n_layers // len(self.pattern), self.n_layers // len(self.ffn_pattern)
        return list(zip(self.pattern * reps_m, self.ffn_pattern * reps_f))


def build_config(raw: dict, path: str = "model") -> LMConfig:
    """LMConfig from a recipe's `model` mapping: the arch preset, overridden by the given keys."""
    from lctrain import models  # noqa: F401  (registers every mixer and arch)
    if not isinstance(raw, dict):
        fail(path, f"expected a mapping, got {raw!r}")
    arch = raw.get("arch", "transformer")
    if arch not in ARCHS:
        fail(f"{path}.arch", f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}" + suggest(arch, ARCHS))
    merged = _deep_merge(ARCHS[arch], raw)
    return from_dict(LMConfig, merged, path)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class ModelOutput:
    logits: Tensor
    aux_loss: Tensor                    # sum of auxiliary losses (MoE load balancing); 0 if none
    stats: dict = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int, mixer_letter: str, ffn_letter: str):
        super().__init__()
        mixer_cls = MIXERS[mixer_letter]
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer_cls(cfg.d_model, cfg.mixers[mixer_cls.name], layer_idx, cfg)
        self.ffn = FFNS[ffn_letter](cfg.d_model, cfg, layer_idx)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps) if self.ffn is not None else None

    def forward(self, x: Tensor, ctx: SeqContext, cache: Optional[dict]) -> Tensor:
        x = x + self.mixer(self.norm1(x), ctx, cache)
        if self.ffn is not None:
            if getattr(self.ffn, "uses_cache", False):   # looks back along the sequence: decoding state
                x = x + self.ffn(self.norm2(x), ctx, None if cache is None else cache.setdefault("ffn", {}))
            else:
                x = x + self.ffn(self.norm2(x), ctx)
        return x


FFNS["S"] = lambda d, cfg, i: SwiGLU(d, swiglu_hidden(d, cfg.ffn_mult))
FFNS["-"] = lambda d, cfg, i: None


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        require(cfg.vocab_size > 0, "model.vocab_size", "must be set (or taken from the tokenizer)")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, m, f) for i, (m, f) in enumerate(cfg.layer_letters()))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.compiled = False
        self.reset_parameters()

    def compile_blocks(self, **options):
        """`torch.compile` every block in place (parameter names and state_dict keys unchanged); the
        sequence ops (chunk scan, attention kernel, conv, collectives) run eagerly between the compiled
        pieces (seqops.EagerOps), so documents, checkpointing and sequence parallelism behave as in eager
        mode. `options` go to torch.compile (e.g. backend="aot_eager" in tests)."""
        for block in self.layers:
            block.compile(**options)
        self.compiled = True

    # --- init -----------------------------------------------------------------------------------
    def reset_parameters(self):
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=out_std if name.endswith("out_proj") else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
        for mod in self.modules():          # mixers with special parameters (A_log, dt_bias, ...)
            if mod is not self and hasattr(mod, "init_weights"):
                mod.init_weights()

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, ctx: Optional[SeqContext] = None,
                cache: Optional[InferenceCache] = None) -> ModelOutput:
        ctx = ctx or SeqContext()
        if cache is not None:
            ctx = dataclasses.replace(ctx, position_offset=cache.seen, knobs=cache.knobs)
        elif ctx.position_offset == 0 and ctx.ops.sp_size > 1:
            ctx = dataclasses.replace(ctx, position_offset=ctx.ops.position_offset(input_ids.shape[1]))
        if self.compiled and not isinstance(ctx.ops, EagerOps):
            ctx = dataclasses.replace(ctx, ops=EagerOps(ctx.ops))
        x = self.embed(input_ids)
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, ctx, None, use_reentrant=False)
            else:
                x = block(x, ctx, layer_cache)
        logits = self.lm_head(self.norm(x))
        if cache is not None:
            cache.seen += input_ids.shape[1]
        aux, stats = logits.new_zeros((), dtype=torch.float32), {}
        for i, block in enumerate(self.layers):
            if block.ffn is not None and getattr(block.ffn, "aux_loss", None) is not None:
                aux = aux + block.ffn.aux_loss
                for k, v in getattr(block.ffn, "stats", {}).items():
                    stats[f"{k}/layer{i}"] = v
        return ModelOutput(logits=logits, aux_loss=aux, stats=stats)

    # --- inference ------------------------------------------------------------------------------
    def init_cache(self, knobs: Optional[InferenceKnobs] = None) -> InferenceCache:
        return InferenceCache(len(self.layers), knobs)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, cache: InferenceCache, chunk_size: Optional[int] = None) -> Tensor:
        """Consume a prompt in chunks (state carried across them); returns the last position's logits."""
        T = input_ids.shape[1]
        step = chunk_size or T
        logits = None
        for s in range(0, T, step):
            logits = self(input_ids[:, s:s + step], cache=cache).logits[:, -1]
        return logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, prefill_chunk: Optional[int] = None,
                 knobs: Optional[InferenceKnobs] = None, eos_id: Optional[int] = None) -> Tensor:
        """Greedy decoding with O(1) state per linear layer; returns the new tokens [B, max_new_tokens]."""
        cache = self.init_cache(knobs)
        logits = self.prefill(input_ids, cache, prefill_chunk)
        out = []
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits = self(nxt, cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)

    # --- accounting -----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count; `active` counts only the experts a token uses (MoE)."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and (name.startswith("embed.") or name.startswith("lm_head.")):
                continue
            n += p.numel()
        if active:
            for mod in self.modules():
                if hasattr(mod, "inactive_params"):
                    n -= mod.inactive_params()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul params (incl. lm_head) + 3 x sequence-mixing FLOPs."""
        n_active = self.num_params(non_embedding=True, active=True) + self.lm_head.weight.numel()
        mixing = sum(b.mixer.flops_per_token(seq_len) for b in self.layers)
        return 6.0 * n_active + 3.0 * mixing

    def state_elements(self, seq_len: int) -> int:
        return sum(b.mixer.state_elements(seq_len) for b in self.layers)

    def summary(self, seq_len: int) -> dict:
        return {"params": self.num_params(), "non_embedding_params": self.num_params(non_embedding=True),
                "active_params": self.num_params(active=True), "flops_per_token": self.flops_per_token(seq_len),
                "state_elements": self.state_elements(seq_len)}
