"""The recipe: one YAML file that fully describes a run, loaded into typed, validated config objects.

`load_recipe(path, overrides)` reads the YAML with `yaml.safe_load`, applies `--set a.b.c=value`
overrides (values parsed as YAML), and validates everything; any problem raises `ConfigError` whose
message is one line starting with the dotted field path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from lctrain.schema import ConfigError, fail, from_dict, require, to_dict


@dataclass
class TokenizerConfig:
    path: Optional[str] = None        # an existing sentencepiece .model; None: train one on the data (cached)
    vocab_size: int = 4096
    train_bytes: int = 20_000_000     # text sample the tokenizer is trained on

    def validate(self, path):
        require(256 <= self.vocab_size <= 1_000_000, f"{path}.vocab_size", f"must be in [256, 1e6], got {self.vocab_size}")
        require(self.train_bytes > 0, f"{path}.train_bytes", f"must be positive, got {self.train_bytes}")
        if self.path is not None and not os.path.isfile(os.path.expanduser(self.path)):
            fail(f"{path}.path", f"tokenizer file not found: {self.path}")


@dataclass
class PasskeyDataConfig:
    """Synthetic passkey-retrieval documents mixed into pretraining (lctrain/data/passkey.py)."""
    docs: int = 0                     # number of documents mixed in (0: none)
    min_tokens: int = 128             # document length range in tokens (prompt + answer), measured
    max_tokens: int = 256             # with the run's tokenizer; keep max_tokens <= train.seq_len
    preamble: bool = True             # the standard task description before the haystack
    haystack: Literal["repeat", "text"] = "repeat"   # repeat: the standard repeated sentences; text: windows
                                      # of the corpus's training split (lctrain/data/passkey.py)
    needle_every: int = 0             # 0: one needle (the standard protocol); N: one keyed needle per N
                                      # tokens, the question names the one asked (RULER's multi-key NIAH)
    questions: int = 1                # keyed needles: questions per document (each about another needle,
                                      # within the same max_tokens; multi-query associative recall)
    seed: int = 0

    def validate(self, path):
        require(self.docs >= 0, f"{path}.docs", f"must be >= 0, got {self.docs}")
        require(self.min_tokens > 0, f"{path}.min_tokens", f"must be positive, got {self.min_tokens}")
        require(self.max_tokens >= self.min_tokens, f"{path}.max_tokens",
                f"must be >= min_tokens={self.min_tokens}, got {self.max_tokens}")
        require(self.needle_every == 0 or self.needle_every >= 32, f"{path}.needle_every",
                f"must be 0 (one needle) or >= 32 tokens (a keyed needle is ~25 tokens), got {self.needle_every}")
        require(self.questions >= 1, f"{path}.questions", f"must be >= 1, got {self.questions}")
        require(self.questions == 1 or self.needle_every > 0, f"{path}.questions",
                f"more than one question needs keyed needles (needle_every > 0), got {self.questions}")


@dataclass
class DataConfig:
    source: Literal["builtin", "jsonl", "parquet", "text", "megatron"] = "builtin"   # builtin = Python stdlib sources
    paths: list[str] = field(default_factory=list)   # files or globs (jsonl / parquet / text); megatron: path
                                      # prefixes of .bin/.idx pairs (Megatron-LM indexed datasets)
    weights: Optional[list[float]] = None   # megatron: blend weights, one per prefix (fraction of sequences)
    text_field: str = "text"          # jsonl / parquet column holding the document text
    streaming: bool = False           # stream large datasets instead of loading them at once
    val_fraction: float = 0.01        # documents held out for validation (stable hash of the doc id)
    max_bytes: Optional[int] = None   # cap on the corpus size read (quick runs and tests)
    cache_dir: Optional[str] = None   # tokenizer / token cache; default ~/.cache/lctrain
    passkey: PasskeyDataConfig = field(default_factory=PasskeyDataConfig)   # synthetic passkey docs mixed in
    num_workers: int = 0              # tokenization processes; 0: one per CPU core, at most 8 (same cache either way)

    def validate(self, path):
        require(self.num_workers >= 0, f"{path}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.source == "megatron":
            from lctrain.data.megatron import validate_megatron_paths
            validate_megatron_paths(self, path)
            return
        require(self.weights is None, f"{path}.weights", "blend weights are for source 'megatron' only")
        require(0.0 <= self.val_fraction < 1.0, f"{path}.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.max_bytes is None or self.max_bytes > 0, f"{path}.max_bytes", "must be positive")
        if self.source == "builtin":
            require(not self.paths, f"{path}.paths", "must be empty for source 'builtin'")
        else:
            require(bool(self.paths), f"{path}.paths", f"needs at least one file for source {self.source!r}")
            import glob
            for i, p in enumerate(self.paths):
                if not glob.glob(os.path.expanduser(p)):
                    fail(f"{path}.paths[{i}]", f"no file matches {p!r}")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8               # sequences per micro-batch on each data-parallel rank
    grad_accum: int = 1
    seq_len: int = 256
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False             # torch.compile each block (sequence ops stay eager; see LanguageModel.compile_blocks)
    max_grad_norm: float = 1.0        # 0 disables clipping
    aux_loss_weight: float = 0.01     # weight of the MoE load-balancing loss
    log_every: int = 10
    val_every: int = 0                # 0: validate only at the end
    val_batches: int = 4
    max_nonfinite_steps: int = 5      # stop after this many non-finite losses in a row (each is skipped)
    num_threads: int = 0              # torch CPU threads; 0 = torch default
    init_from: Optional[str] = None   # continued pretraining: start from these weights (lctrain import dir,
                                      # lctrain export .safetensors, run or checkpoint dir), fresh optimizer

    def validate(self, path):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "val_batches", "max_nonfinite_steps"):
            v = getattr(self, name)
            require(v > 0, f"{path}.{name}", f"must be positive, got {v}")
        require(self.val_every >= 0, f"{path}.val_every", f"must be >= 0, got {self.val_every}")
        require(self.max_grad_norm >= 0, f"{path}.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        require(self.aux_loss_weight >= 0, f"{path}.aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")
        require(self.num_threads >= 0, f"{path}.num_threads", f"must be >= 0, got {self.num_threads}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1         # decay floor as a fraction of lr
    warmup_steps: int = 10
    # cosine / linear: decay over all steps after warmup; constant; wsd: warmup-stable-decay (the
    # decay is the last decay_steps, or decay_fraction of train.steps): a run can be extended
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2       # wsd: fraction of train.steps spent decaying (when decay_steps is 0)
    decay_steps: int = 0              # wsd: decay length in steps (overrides decay_fraction)
    decay_shape: Literal["linear", "1-sqrt", "cosine"] = "linear"   # wsd: shape of the final decay
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def validate(self, path):
        require(self.lr > 0, f"{path}.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 < self.decay_fraction <= 1, f"{path}.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        require(self.decay_steps >= 0, f"{path}.decay_steps", f"must be >= 0, got {self.decay_steps}")
        require(self.weight_decay >= 0, f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
                f"must be two numbers in [0, 1), got {self.betas}")
        require(self.eps > 0, f"{path}.eps", f"must be positive, got {self.eps}")


@dataclass
class ParallelConfig:
    sp: int = 1                       # sequence-parallel group size (divides the world size)
    sp_attention: Literal["ulysses", "lasp2h"] = "ulysses"   # softmax attention under SP
    zero_stage: int = 0               # 0 = plain data parallel; 1/2/3 = DeepSpeed ZeRO
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0          # a hung collective fails after this many seconds

    def validate(self, path):
        require(self.sp >= 1, f"{path}.sp", f"must be >= 1, got {self.sp}")
        require(self.zero_stage in (0, 1, 2, 3), f"{path}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.timeout_s > 0, f"{path}.timeout_s", f"must be positive, got {self.timeout_s}")


@dataclass
class CheckpointConfig:
    every: int = 0                    # save every N steps (0: only at the end)
    keep_last: int = 2                # completed checkpoints kept (older ones deleted)

    def validate(self, path):
        require(self.every >= 0, f"{path}.every", f"must be >= 0, got {self.every}")
        require(self.keep_last >= 1, f"{path}.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "lctrain"
    progress: Literal["auto", "on", "off"] = "auto"   # auto: a bar on interactive terminals only


@dataclass
class PasskeyEvalConfig:
    """`lctrain eval passkey` defaults (lctrain/eval/passkey.py): a grid of lengths x depths."""
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])   # prompt tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth
    samples: int = 5                  # prompts (random keys) per cell
    max_new_tokens: int = 8           # greedy decoding budget for the answer
    chunk_size: int = 2048            # prefill chunk (memory bound for linear models)
    preamble: Optional[bool] = None   # None: as the run's data.passkey.preamble
    haystack: Optional[Literal["repeat", "text"]] = None   # None: as the run's data.passkey.haystack; text:
                                      # windows of the held-out split of the run's corpus
    needle_every: Optional[int] = None   # None: as the run's data.passkey.needle_every
    seed: int = 1234

    def validate(self, path):
        require(bool(self.lengths) and all(n > 0 for n in self.lengths), f"{path}.lengths",
                f"must be a non-empty list of positive token counts, got {self.lengths}")
        require(bool(self.depths) and all(0.0 <= d <= 1.0 for d in self.depths), f"{path}.depths",
                f"must be a non-empty list of numbers in [0, 1], got {self.depths}")
        for name in ("samples", "max_new_tokens", "chunk_size"):
            require(getattr(self, name) > 0, f"{path}.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.needle_every in (None, 0) or self.needle_every >= 32, f"{path}.needle_every",
                f"must be 0 (one needle) or >= 32 tokens (a keyed needle is ~25 tokens), got {self.needle_every}")


@dataclass
class LengthEvalConfig:
    """`lctrain eval length` defaults (lctrain/eval/length.py): per-position loss and state statistics."""
    length: int = 16384               # tokens per evaluated sequence
    samples: int = 4                  # sequences averaged
    source: Literal["concat", "document"] = "concat"   # concat: held-out docs joined into one stream
    buckets_per_octave: int = 2       # log-spaced position buckets
    mitigations: list[str] = field(default_factory=lambda: ["none"])   # e.g. decay_scale=2,state_window=256
    chunk_size: int = 2048            # prefill chunk (memory bound for linear models)
    seed: int = 0
    probes: list[str] = field(default_factory=list)   # lctrain/eval/probes.py; empty: the `source` above
    warmup: int = 16                  # "within the training length" starts at this position

    def validate(self, path):
        require(self.length >= 2, f"{path}.length", f"must be >= 2, got {self.length}")
        require(self.warmup >= 1, f"{path}.warmup", f"must be >= 1, got {self.warmup}")
        from lctrain.eval.probes import parse_probe
        for i, p in enumerate(self.probes):
            parse_probe(p, f"{path}.probes[{i}]")
        for name in ("samples", "buckets_per_octave", "chunk_size"):
            require(getattr(self, name) > 0, f"{path}.{name}", f"must be positive, got {getattr(self, name)}")
        require(bool(self.mitigations), f"{path}.mitigations", "must list at least one (e.g. none)")
        from lctrain.eval.mitigations import parse_mitigation
        for i, m in enumerate(self.mitigations):
            parse_mitigation(m, f"{path}.mitigations[{i}]")


@dataclass
class EvalConfig:
    """Long-context evaluation defaults (lctrain.eval): `lctrain eval passkey|length` and the studies."""
    passkey: PasskeyEvalConfig = field(default_factory=PasskeyEvalConfig)
    length: LengthEvalConfig = field(default_factory=LengthEvalConfig)


@dataclass
class Recipe:
    name: str = "run"
    run_dir: Optional[str] = None     # default: runs/<name>
    seed: int = 0
    model: Any = field(default_factory=dict)   # validated into models.LMConfig (see lctrain/models/base.py)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, path=""):
        from lctrain.models import build_config
        if self.train.init_from and isinstance(self.model, dict) and "arch" not in self.model:
            # continued pretraining: the source's architecture, the recipe's model keys on top
            from lctrain.interop.init import source_model_config
            from lctrain.models.base import _deep_merge
            self.model = _deep_merge(source_model_config(self.train.init_from), self.model)
        self.model = build_config(self.model if self.model is not None else {}, "model")
        require(self.data.source != "megatron" or self.tokenizer.path is not None, "tokenizer.path",
                "source 'megatron' holds token ids: give the sentencepiece .model that produced them")
        require(self.train.seq_len % self.parallel.sp == 0, "train.seq_len",
                f"{self.train.seq_len} must be divisible by parallel.sp={self.parallel.sp}")
        if self.optim.schedule == "wsd":
            require(self.optim.decay_steps <= self.train.steps - self.optim.warmup_steps, "optim.decay_steps",
                    f"{self.optim.decay_steps} decay steps do not fit after {self.optim.warmup_steps} warmup steps "
                    f"in train.steps={self.train.steps}")
        if self.run_dir is None:
            self.run_dir = os.path.join("runs", self.name)

    def to_dict(self) -> dict:
        return to_dict(self)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw recipe dict in place."""
    if "=" not in assignment:
        raise ConfigError("--set", f"expected key.path=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("--set", f"bad key path {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[:i + 1]), f"is not a mapping, cannot set {key}")
        node = nxt
    node[parts[-1]] = parsed


# Sections a recipe file must spell out (defaults exist for everything else).
REQUIRED_SECTIONS = {"model": "model to train (e.g. model: {arch: gla})",
                     "data": "data to train on (e.g. data: {source: builtin, max_bytes: 12000000})"}


def load_recipe_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("recipe", f"file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("recipe", f"invalid YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:           # an empty file, or only comments: not "all defaults" (a 100-step run on everything)
        raise ConfigError("recipe", f"{path} is empty: a recipe needs at least {' and '.join(REQUIRED_SECTIONS)} "
                                    f"sections (see recipes/quickstart.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError("recipe", f"{path} must hold a mapping at the top level, got {type(raw).__name__}")
    for key in REQUIRED_SECTIONS:
        if raw.get(key) in (None, {}):
            raise ConfigError(key, f"missing from {path}: a recipe must say which {REQUIRED_SECTIONS[key]}")
    return raw


def recipe_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> Recipe:
    raw = dict(raw)
    for a in overrides or []:
        apply_override(raw, a)
    return from_dict(Recipe, raw, "")


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    return recipe_from_dict(load_recipe_dict(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
