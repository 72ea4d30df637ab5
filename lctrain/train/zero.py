"""Optimizer engines: plain data parallel (ZeRO-0) and DeepSpeed ZeRO 1/2/3, behind one interface.

The trainer drives either engine the same way (forward, backward per micro-batch, one optimizer step
per global batch, save, load), so the recipe stays the one source of truth:

- **ZeRO-0** (`PlainEngine`): the model, torch AdamW with our parameter groups, gradients summed over
  DP x SP by `pc.all_reduce_grads`, torch's `clip_grad_norm_`. No DeepSpeed import: single-process CPU
  runs stay light.
- **ZeRO 1/2/3** (`ZeroEngine`): `deepspeed.initialize` with the *same* torch AdamW (same parameter
  groups, betas, eps, weight decay) as the client optimizer, sharded over the whole DP x SP world
  (parameters are replicated over SP ranks, so every rank holds 1/world of the optimizer state, and
  of the gradients / parameters for stages 2 / 3). The recipe maps onto the DeepSpeed config
  (`deepspeed_config`): micro-batch and accumulation, `gradient_clipping = train.max_grad_norm`,
  precision (`bf16` = torch autocast, as on the ZeRO-0 path, through DeepSpeed's `torch_autocast`;
  weights, gradients and optimizer states stay fp32), no DeepSpeed LR scheduler: the trainer sets
  `lr_at(step)` on the parameter groups before every step.

Numerics. The loss is sum of token losses / global token count and gradients must be *summed* over
DP x SP; DeepSpeed averages them over its data-parallel group (the world), so the backward loss is
multiplied by the world size. With `scale_wrt_gas=False` nothing else rescales it. Clipping uses the
same formula as torch (`max_norm / (norm + 1e-6)`). Non-finite losses/gradients: a rank whose loss is
not finite multiplies it by NaN before backward, so its gradients are NaN; DeepSpeed's overflow check
(an all-reduce of the flag over the world) then skips the step on every rank, like the ZeRO-0 path.

Checkpoints. ZeRO-0 writes `model.pt` + `optim.pt` (layout-free). ZeRO-n writes DeepSpeed's sharded
files under `zero/` (one optimizer shard per rank; stage 3 also one parameter shard per rank) plus a
consolidated `model.pt` (stage 1/2: the replicated weights; stage 3: gathered on rank 0), so eval and
export read any checkpoint the same way. Resuming with the same stage and world size loads the shards
natively (exact). Any other change (stage, world size, ZeRO-0 <-> ZeRO-n) goes through a *full state*:
fp32 weights and AdamW moments per parameter name, read from `model.pt`/`optim.pt` or from the shards
(DeepSpeed's own universal-checkpoint converter, `ds_to_universal`), then written into the new layout
(torch state dicts, or DeepSpeed's fragment API `safe_set_full_*` for ZeRO-n).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from lctrain.train import checkpoint as ckpt
from lctrain.train.optim import build_optimizer, param_groups

ZERO_DIR = "zero"                 # DeepSpeed's tag (sub-directory) inside our checkpoint directory
UNIVERSAL_PREFIX = ".universal-"  # private conversion dirs in checkpoints/ (mkdtemp; stale ones: ckpt.clean_stale)


def autocast_for(recipe, device: torch.device):
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def uses_bf16(recipe, device: torch.device) -> bool:
    return recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")


def deepspeed_config(recipe, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config a recipe maps to (ZeRO stage >= 1)."""
    t, p = recipe.train, recipe.parallel
    cfg = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.max_grad_norm),
        "zero_optimization": {"stage": p.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if uses_bf16(recipe, device):
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


# --- the full (layout-free) training state ---------------------------------------------------------
@dataclass
class FullState:
    """fp32 weights and AdamW moments per canonical parameter name (tied parameters once), the
    number of applied optimizer steps per name, and the model's buffers."""
    params: dict = field(default_factory=dict)
    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)


@dataclass
class ModelLayout:
    """Names, shapes and optimizer order of a model's parameters, taken before any ZeRO-3 partitioning
    (which empties the tensors): canonical name -> shape, every state-dict alias -> canonical name
    (tied weights), and the canonical names in torch AdamW's parameter-index order."""
    shapes: dict
    alias: dict
    optim_order: list

    @staticmethod
    def of(model: torch.nn.Module, weight_decay: float) -> "ModelLayout":
        names = {id(p): n for n, p in model.named_parameters()}
        return ModelLayout(shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
                           alias={n: names[id(p)] for n, p in model.named_parameters(remove_duplicate=False)},
                           optim_order=[names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]])


def full_state_from_torch(path: str, layout: ModelLayout) -> FullState:
    """From a ZeRO-0 checkpoint (model.pt + optim.pt)."""
    sd = ckpt.load_tensor_file(path, "model.pt")
    opt = ckpt.load_tensor_file(path, "optim.pt")
    full = FullState()
    for k, v in sd.items():
        if k in layout.alias:
            full.params.setdefault(layout.alias[k], v.float())
        else:
            full.buffers[k] = v
    missing = [n for n in layout.shapes if n not in full.params]
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path}: model.pt has no weights for {missing[0]} (a different model?)")
    groups = opt.get("param_groups", [])
    if sum(len(g["params"]) for g in groups) != len(layout.optim_order):
        raise ckpt.CheckpointError(f"checkpoint {path}: optim.pt holds {sum(len(g['params']) for g in groups)} "
                                   f"parameters, the model {len(layout.optim_order)} (a different model?)")
    for idx, st in opt.get("state", {}).items():
        name = layout.optim_order[int(idx)]
        full.exp_avg[name], full.exp_avg_sq[name] = st["exp_avg"].float(), st["exp_avg_sq"].float()
        full.steps[name] = float(st["step"])
    return full


def _run_ds_to_universal(src: str, dst: str):
    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal.main(args)


def full_state_from_deepspeed(path: str, layout: ModelLayout, adam_steps: int, pc) -> FullState:
    """From a ZeRO-n checkpoint's shards: rank 0 converts them with DeepSpeed's universal-checkpoint
    converter into a private directory next to the checkpoint (same file system, fresh name: nothing
    planted there is read), every rank reads the per-parameter tensors, rank 0 cleans up. The shards
    must have been vetted (`ckpt.vet_checkpoint`): DeepSpeed's converter unpickles them unrestricted."""
    import tempfile
    root = os.path.dirname(os.path.abspath(path))
    error = work = None
    if pc.is_main:
        work = tempfile.mkdtemp(prefix=UNIVERSAL_PREFIX + os.path.basename(path) + "-", dir=root)
        try:
            # (the converter also writes a `latest_universal` file next to its output: inside `work`)
            _run_ds_to_universal(os.path.join(path, ZERO_DIR), os.path.join(work, "out"))
        except Exception as e:   # reported on every rank below
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    error, work = pc.broadcast_object((error, work))
    if error:
        if pc.is_main:
            shutil.rmtree(work, ignore_errors=True)
        raise ckpt.CheckpointError(f"checkpoint {path}: cannot convert its ZeRO shards to a full state ({error})")
    full = FullState()
    try:
        zdir = os.path.join(work, "out", "zero")
        for name, shape in layout.shapes.items():
            pdir = os.path.join(zdir, name)
            full.params[name] = _read_universal(os.path.join(pdir, "fp32.pt"), shape, path, name)
            if os.path.isfile(os.path.join(pdir, "exp_avg.pt")):
                full.exp_avg[name] = _read_universal(os.path.join(pdir, "exp_avg.pt"), shape, path, name)
                full.exp_avg_sq[name] = _read_universal(os.path.join(pdir, "exp_avg_sq.pt"), shape, path, name)
                full.steps[name] = float(adam_steps)
        sd = ckpt.load_tensor_file(path, "model.pt") if os.path.isfile(os.path.join(path, "model.pt")) else {}
        full.buffers = {k: v for k, v in sd.items() if k not in layout.alias}
    finally:
        pc.barrier()
        if pc.is_main:
            shutil.rmtree(work, ignore_errors=True)
    return full


def read_full_state(path: str, fmt: str, layout: ModelLayout, adam_steps: int, pc) -> FullState:
    """The full state of checkpoint `path` written in format `fmt` ("torch" or "deepspeed")."""
    if fmt == "deepspeed":
        return full_state_from_deepspeed(path, layout, adam_steps, pc)
    return full_state_from_torch(path, layout)


def _read_universal(file: str, shape, path: str, name: str) -> torch.Tensor:
    if not os.path.isfile(file):
        raise ckpt.CheckpointError(f"checkpoint {path}: its ZeRO shards hold no state for parameter {name}")
    x = torch.load(file, map_location="cpu", weights_only=True)
    t = x["param"] if isinstance(x, dict) else x
    if t.numel() != math.prod(shape):
        raise ckpt.CheckpointError(f"checkpoint {path}: parameter {name} has {t.numel()} elements, the model "
                                   f"{math.prod(shape)} (a different model?)")
    return t.reshape(shape).float()


# --- engines ---------------------------------------------------------------------------------------
class PlainEngine:
    """ZeRO-0: plain data parallel with torch AdamW."""
    format = "torch"
    zero_stage = 0

    def __init__(self, model, recipe, pc, device):
        self.module, self.recipe, self.pc, self.device = model, recipe, pc, device
        self.layout = ModelLayout.of(model, recipe.optim.weight_decay)
        self.optimizer = build_optimizer(model, recipe.optim)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, input_ids, ctx):
        with autocast_for(self.recipe, self.device):
            return self.module(input_ids, ctx)

    def backward(self, loss, local_finite: bool, last: bool):
        loss.backward()

    def reduce_grads(self):
        self.pc.all_reduce_grads(self.params)

    def step(self, lr: float, loss_finite: bool) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if loss_finite:
            max_norm = self.recipe.train.max_grad_norm
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf")))
            ok = math.isfinite(grad_norm)
        else:
            grad_norm, ok = float("nan"), False
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def save(self, tmp: str):
        if self.pc.is_main:
            torch.save(self.module.state_dict(), os.path.join(tmp, "model.pt"))
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optim.pt"))

    def load(self, path: str):
        self.module.load_state_dict(ckpt.load_tensor_file(path, "model.pt", self.device))
        self.optimizer.load_state_dict(ckpt.load_tensor_file(path, "optim.pt", self.device))

    def load_full(self, full: FullState):
        model = self.module
        sd = model.state_dict()
        alias = self.layout.alias
        new = {}
        for k, v in sd.items():
            src = full.params.get(alias[k]) if k in alias else full.buffers.get(k)
            if k in alias and src is None:
                raise ckpt.CheckpointError(f"checkpoint has no weights for parameter {alias[k]}")
            new[k] = (src if src is not None else v).to(v.dtype)
        model.load_state_dict(new)
        state = {}
        for i, name in enumerate(self.layout.optim_order):
            if name in full.exp_avg:
                state[i] = {"step": torch.tensor(full.steps[name], dtype=torch.float32),
                            "exp_avg": full.exp_avg[name].clone(), "exp_avg_sq": full.exp_avg_sq[name].clone()}
        groups, i = [], 0
        for g in self.optimizer.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(i, i + len(g["params"])))})
            i += len(g["params"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def close(self):
        pass


def _quiet_deepspeed():
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass


class ZeroEngine:
    """DeepSpeed ZeRO 1/2/3 over the whole DP x SP world, with our torch AdamW and schedule."""
    format = "deepspeed"

    def __init__(self, model, recipe, pc, device):
        self.recipe, self.pc, self.device = recipe, pc, device
        self.zero_stage = recipe.parallel.zero_stage
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch.distributed as dist
        self._own_group = False
        if not dist.is_initialized():
            # one process: DeepSpeed still needs a process group; a private one-rank gloo group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        import deepspeed
        _quiet_deepspeed()
        self._install_world_group(dist)
        # Lets DeepSpeed's universal-checkpoint converter read our ZeRO 1/2 shards.
        model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
        self.world = dist.get_world_size()
        self.layout = ModelLayout.of(model, recipe.optim.weight_decay)
        optimizer = build_optimizer(model, recipe.optim)
        # DeepSpeed insists on torchrun's variables; a single process without torchrun has none
        added = {k: v for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")) if k not in os.environ}
        os.environ.update(added)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(recipe, self.world, device))
        finally:
            for k in added:
                os.environ.pop(k, None)
        self.module = self.engine.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def _install_world_group(self, dist):
        """DeepSpeed shards and reduces over its clone of the world group (DP x SP here), which it would
        create with the backend's default timeout (30 min on gloo); ours carries parallel.timeout_s so
        a hung ZeRO collective fails like any other."""
        import datetime
        from deepspeed.utils import groups
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=float(self.recipe.parallel.timeout_s)))

    def forward(self, input_ids, ctx):
        return self.engine(input_ids, ctx)

    def backward(self, loss, local_finite: bool, last: bool):
        if not local_finite:
            loss = loss * float("nan")       # NaN gradients: DeepSpeed's overflow check skips the step everywhere
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        if not last:
            self.engine.step()               # not an accumulation boundary: no update

    def reduce_grads(self):
        pass                                 # DeepSpeed reduced (and partitioned) them in the last backward

    def step(self, lr: float, loss_finite: bool) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return (norm if applied else float("nan")), applied

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, tmp: str):
        self.engine.save_checkpoint(tmp, tag=ZERO_DIR, save_latest=False)
        sd = self._consolidated_state_dict()
        if self.pc.is_main:
            torch.save(sd, os.path.join(tmp, "model.pt"))

    def _consolidated_state_dict(self) -> Optional[dict]:
        """Full weights on rank 0 (stage 3 gathers them; stages 1/2 hold them on every rank)."""
        if self.zero_stage < 3:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()} if self.pc.is_main else None
        import deepspeed
        out = {}
        alias = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            alias.setdefault(id(p), []).append(n)
        for _, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.pc.is_main:
                    for n in alias[id(p)]:
                        out[n] = p.detach().cpu().clone()
        if self.pc.is_main:
            for n, b in self.module.named_buffers():
                out[n] = b.detach().cpu().clone()
            order = list(self.module.state_dict().keys())
            out = {k: out[k] for k in order if k in out}
        return out if self.pc.is_main else None

    def load(self, path: str):
        loaded, _ = self.engine.load_checkpoint(path, tag=ZERO_DIR, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise ckpt.CheckpointError(f"checkpoint {path}: DeepSpeed found no ZeRO shards under {ZERO_DIR}/")

    def load_full(self, full: FullState):
        """Write a full state into this engine's partitions (DeepSpeed's fragment API)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        zopt = self.optimizer
        base = zopt.optimizer
        flats = zopt.fp32_partitioned_groups_flat if self.zero_stage == 3 else zopt.single_partition_of_fp32_groups
        steps = {full.steps[n] for n in full.steps}
        step = max(steps) if steps else 0.0
        if steps:
            # torch AdamW's own lazy state, created up front so the moments can be written into it
            for hp in flats:
                base.state[hp] = {"step": torch.tensor(step, dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
            if self.zero_stage < 3:
                zopt._lazy_init_hp_params_optimizer_state()
        names = list(self.module.named_parameters())
        for name, p in names:
            if name not in full.params:
                raise ckpt.CheckpointError(f"checkpoint has no weights for parameter {name}")
            value = full.params[name].to(self.device)
            safe_set_full_fp32_param(p, value)
            if steps:
                zeros = torch.zeros_like(value)
                safe_set_full_optimizer_state(p, full.exp_avg.get(name, zeros).to(self.device), "exp_avg")
                safe_set_full_optimizer_state(p, full.exp_avg_sq.get(name, zeros).to(self.device), "exp_avg_sq")
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.pc.is_main:
                        p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
        buffers = dict(self.module.named_buffers())
        for k, v in full.buffers.items():
            if k in buffers:
                buffers[k].data.copy_(v.to(buffers[k].dtype))

    def close(self):
        try:
            self.engine.destroy()
        except Exception:
            pass
        # DeepSpeed keeps its groups and comm backend in module globals: forget them, so a later engine
        # in this process (on a new process group) builds its own.
        from deepspeed import comm as ds_comm
        from deepspeed.utils import groups
        groups._WORLD_GROUP = None
        ds_comm.comm.cdb = None
        if self._own_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self._own_group = False


def build_engine(model, recipe, pc, device):
    if recipe.parallel.zero_stage == 0:
        return PlainEngine(model, recipe, pc, device)
    return ZeroEngine(model, recipe, pc, device)
