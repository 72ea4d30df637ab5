"""The training loop: one recipe in, one run directory out.

Exactness rules the design: the data order is a function of (seed, data position), the learning rate
a function of the step, and a checkpoint holds model, optimizer, RNG states and the data position,
so N steps + resume + N steps is bitwise equal to 2N steps on CPU.

Loss: every rank sums its token losses and divides by the token count of the whole global batch
(all micro-batches, all data- and sequence-parallel ranks); gradients are then summed over DP×SP.
Sequence parallelism therefore changes nothing numerically.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lctrain.config import Recipe, dump_recipe
from lctrain.data.dataset import DataOrder, PackedSequences, PreparedData, prepare_data
from lctrain.models import LanguageModel, SeqContext, build_model
from lctrain.parallel import init_parallel
from lctrain.schema import ConfigError
from lctrain.train import checkpoint as ckpt
from lctrain.train.metrics import MetricsLogger, device_peak_flops, peak_memory_bytes
from lctrain.train.optim import build_optimizer, lr_at


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    consumed: int = 0        # training sequences consumed (the data position)
    tokens: int = 0          # training tokens consumed
    nonfinite_in_row: int = 0
    skipped_steps: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pick_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda requested but no GPU is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_for(recipe: Recipe, device: torch.device):
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="sum", ignore_index=-100)


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to save a checkpoint and leave after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:     # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Optional[str] = None, resume: str = "auto",
                 log: Callable[[str], None] = print):
        self.recipe = recipe
        self.run_dir = run_dir or recipe.run_dir
        self.resume = resume
        self.device = pick_device(recipe)
        self.pc = init_parallel(recipe.parallel, self.device.type)
        self._log = log
        t = recipe.train
        self.global_batch = t.batch_size * t.grad_accum * self.pc.dp_size     # sequences per step
        self.tokens_per_step = self.global_batch * t.seq_len

    def log(self, msg: str):
        if self.pc.is_main:
            self._log(msg)

    # --- setup ----------------------------------------------------------------------------------
    def _prepare_data(self) -> PreparedData:
        if self.pc.is_main:
            data = prepare_data(self.recipe, self.log)
        self.pc.barrier()
        if not self.pc.is_main:
            data = prepare_data(self.recipe, lambda m: None)
        return data

    def _prepare_run_dir(self, data: PreparedData):
        if not self.pc.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "recipe.yaml"), "w") as f:
            f.write(dump_recipe(self.recipe))
        dst = os.path.join(self.run_dir, "tokenizer.model")
        if os.path.abspath(data.tokenizer.path) != os.path.abspath(dst):
            shutil.copyfile(data.tokenizer.path, dst)

    def _build_model(self, vocab: int) -> LanguageModel:
        cfg = self.recipe.model
        if cfg.vocab_size == 0:
            cfg.vocab_size = vocab
        elif cfg.vocab_size < vocab:
            raise ConfigError("model.vocab_size", f"{cfg.vocab_size} is smaller than the tokenizer's {vocab}")
        torch.manual_seed(self.recipe.seed)
        model = build_model(cfg).to(self.device)
        model.activation_checkpointing = self.recipe.train.activation_checkpointing
        return model

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, model, optimizer, state: TrainState):
        tmp = None
        if self.pc.is_main:
            tmp = ckpt.staging_dir(self.run_dir, state.step)
        tmp = self.pc.broadcast_object(tmp)
        ckpt.save_rng(tmp, self.pc.rank)
        if self.pc.is_main:
            torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
            ckpt.write_state(tmp, {**state.to_dict(), **ckpt.host_rng_state(), "world_size": self.pc.world_size,
                                   "dp_size": self.pc.dp_size, "sp_size": self.pc.sp_size,
                                   "global_batch": self.global_batch, "seq_len": self.recipe.train.seq_len,
                                   "zero_stage": self.recipe.parallel.zero_stage})
        self.pc.barrier()
        if self.pc.is_main:
            final = ckpt.publish(tmp, self.recipe.checkpoint.keep_last)
            self.log(f"checkpoint saved: {final}")
        self.pc.barrier()

    def _load(self, path: str, model, optimizer) -> TrainState:
        st = ckpt.read_state(path)
        for key, mine in (("dp_size", self.pc.dp_size), ("sp_size", self.pc.sp_size), ("global_batch", self.global_batch),
                          ("seq_len", self.recipe.train.seq_len)):
            if key in st and st[key] != mine:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} was written with {key}={st[key]}, this run has {mine}: resume with the same "
                    f"parallel layout and batch shape, or start a new run dir (lctrain export makes a single-file model)")
        model.load_state_dict(ckpt.load_tensor_file(path, "model.pt", self.device))
        optimizer.load_state_dict(ckpt.load_tensor_file(path, "optim.pt", self.device))
        ckpt.load_rng(path, self.pc.rank)
        ckpt.set_host_rng_state(st)
        return TrainState(**{k: st[k] for k in TrainState().to_dict()})

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model, val: PackedSequences) -> float:
        t = self.recipe.train
        model.eval()
        n = min(len(val), t.val_batches * t.batch_size * self.pc.dp_size)
        ids = list(range(self.pc.dp_rank, n, self.pc.dp_size))
        total = torch.zeros(2, dtype=torch.float64)
        for s in range(0, len(ids), t.batch_size):
            batch = self._shard(val.batch(ids[s:s + t.batch_size]))
            with autocast_for(self.recipe, self.device):
                out = model(batch["input_ids"], SeqContext(doc_start=batch["doc_start"], ops=self.pc.seq_ops))
            total[0] += token_loss_sum(out.logits, batch["labels"]).double().cpu()
            total[1] += batch["labels"].numel()
        model.train()
        total = self.pc.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def _shard(self, batch: dict) -> dict:
        return {k: self.pc.shard_sequence(v.to(self.device), dim=1) for k, v in batch.items()}

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        r, t = self.recipe, self.recipe.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        data = self._prepare_data()
        self._prepare_run_dir(data)
        model = self._build_model(data.tokenizer.vocab_size)
        optimizer = build_optimizer(model, r.optim)
        params = [p for p in model.parameters() if p.requires_grad]
        state = TrainState()
        source = None
        if self.resume != "never":
            source = ckpt.latest_checkpoint(self.run_dir) if self.resume == "auto" else ckpt.resolve_checkpoint(self.resume)
        if source:
            state = self._load(source, model, optimizer)
            self.log(f"resumed from {source} at step {state.step}")
        order = DataOrder(len(data.train), r.seed)
        if data.val is None:
            self.log("no validation sequences (data.val_fraction too small for this corpus): val_loss is not reported")
        info = model.summary(t.seq_len)
        self.log(f"model {r.model.arch}: {info['params'] / 1e6:.2f}M params ({info['non_embedding_params'] / 1e6:.2f}M "
                 f"non-embedding), {self.tokens_per_step:,} tokens/step, budget {self.tokens_per_step * t.steps:,} tokens "
                 f"({t.steps} steps), world {self.pc.world_size} = dp {self.pc.dp_size} x sp {self.pc.sp_size}, "
                 f"device {self.device}, data {len(data.train):,} train sequences of {t.seq_len}")
        metrics = MetricsLogger(self.run_dir, r, self.pc.is_main, t.steps, state.step)
        peak = device_peak_flops(self.device)
        mb, L, dp = t.batch_size, t.seq_len, self.pc.dp_size
        last_val = None
        t_last, tok_last = time.perf_counter(), state.tokens
        saved_at = state.step if source else -1
        status, step_loss = "completed", float("nan")
        with _StopFlag() as stop:
            while state.step < t.steps:
                lr = lr_at(state.step, t.steps, r.optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), dtype=torch.float64)
                aux_sum = torch.zeros((), dtype=torch.float64)
                for micro in range(t.grad_accum):
                    first = state.consumed + (micro * dp + self.pc.dp_rank) * mb
                    batch = self._shard(data.train.batch(order.indices(first, mb)))
                    with autocast_for(r, self.device):
                        out = model(batch["input_ids"], SeqContext(doc_start=batch["doc_start"], ops=self.pc.seq_ops))
                    lsum = token_loss_sum(out.logits, batch["labels"])
                    loss = lsum / self.tokens_per_step
                    if t.aux_loss_weight and out.aux_loss.requires_grad:
                        loss = loss + t.aux_loss_weight * out.aux_loss / (t.grad_accum * self.pc.world_size)
                    loss.backward()
                    loss_sum += lsum.detach().double().cpu()
                    aux_sum += out.aux_loss.detach().double().cpu()
                self.pc.all_reduce_grads(params)
                totals = self.pc.all_reduce(torch.stack([loss_sum, aux_sum, torch.tensor(float(stop.signum), dtype=torch.float64)]))
                step_loss = float(totals[0]) / self.tokens_per_step
                if math.isfinite(step_loss):
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
                    ok = math.isfinite(grad_norm)
                else:
                    grad_norm, ok = float("nan"), False
                if ok:
                    optimizer.step()
                    state.nonfinite_in_row = 0
                else:
                    state.nonfinite_in_row += 1
                    state.skipped_steps += 1
                    self.log(f"step {state.step + 1}: non-finite loss/gradient ({step_loss}), step skipped "
                             f"({state.nonfinite_in_row} in a row)")
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.consumed += self.global_batch
                state.tokens += self.tokens_per_step
                if state.nonfinite_in_row >= t.max_nonfinite_steps:
                    metrics.close()
                    raise TrainingError(f"stopping: {state.nonfinite_in_row} non-finite losses in a row at step "
                                        f"{state.step} (train.max_nonfinite_steps={t.max_nonfinite_steps}); "
                                        f"last good checkpoint is kept")
                is_last = state.step == t.steps
                if data.val is not None and ((t.val_every and state.step % t.val_every == 0) or is_last):
                    last_val = self.validate(model, data.val)
                if state.step % t.log_every == 0 or is_last or (t.val_every and state.step % t.val_every == 0):
                    now = time.perf_counter()
                    tps = (state.tokens - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, state.tokens
                    rec = {"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens": state.tokens, "tokens_per_s": tps,
                           "peak_mem_bytes": peak_memory_bytes(self.device), "skipped_steps": state.skipped_steps}
                    if float(totals[1]):
                        rec["aux_loss"] = float(totals[1]) / (t.grad_accum * self.pc.world_size)
                    if peak:
                        rec["mfu"] = tps / self.pc.world_size * info["flops_per_token"] / peak
                    if last_val is not None and (is_last or (t.val_every and state.step % t.val_every == 0)):
                        rec["val_loss"] = last_val
                    comm = self.pc.pop_comm_bytes()
                    rec.update({f"comm_bytes/{k}": v for k, v in comm.items()})
                    metrics.log(rec)
                    metrics.progress(state.step, step_loss, tps)
                    if not metrics.bar:
                        self.log(f"step {state.step}/{t.steps} loss {step_loss:.4f} lr {lr:.2e} "
                                 f"grad_norm {grad_norm:.3f} {tps:,.0f} tok/s"
                                 + (f" val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""))
                every = r.checkpoint.every
                if (every and state.step % every == 0) or is_last:
                    self.save(model, optimizer, state)
                    saved_at = state.step
                if float(totals[2]) and not is_last:
                    if saved_at != state.step:
                        self.save(model, optimizer, state)
                    status = "interrupted"
                    self.log(f"interrupted by signal at step {state.step}: checkpoint saved; run the same command to resume")
                    break
        metrics.close()
        return {"status": status, "step": state.step, "loss": step_loss if state.step else None,
                "val_loss": last_val, "run_dir": self.run_dir, **info}


def train(recipe: Recipe, run_dir: Optional[str] = None, resume: str = "auto",
          log: Callable[[str], None] = print) -> dict:
    trainer = Trainer(recipe, run_dir, resume, log)
    try:
        return trainer.run()
    finally:
        trainer.pc.shutdown()
