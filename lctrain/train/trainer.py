"""The training loop: one recipe in, one run directory out.

Exactness rules the design: the data order is a function of (seed, data position), the learning rate
a function of the step, and a checkpoint holds model, optimizer, RNG states and the data position,
so N steps + resume + N steps is bitwise equal to 2N steps on CPU.

Loss: every rank sums its token losses and divides by the token count of the whole global batch
(all micro-batches, all data- and sequence-parallel ranks); gradients are then summed over DP×SP.
Sequence parallelism therefore changes nothing numerically.

The optimizer side is an engine (`lctrain/train/zero.py`): plain data parallel with torch AdamW for
`parallel.zero_stage: 0`, DeepSpeed ZeRO 1/2/3 otherwise; both get the same loss, learning rate per
step, clipping and non-finite handling, and both checkpoint atomically into the same directory layout.

Fault tolerance: every step's record carries the data position (`data_start`, `consumed`: sequences
of the global order before / after the step), so the lineage of a run shows no batch skipped or seen
twice. A resumed run marks its first record with `resumed_from` and `restart` (torchrun's restart
count); records of steps that a restart rolled back (after the last checkpoint) move from
`metrics.jsonl` to `metrics.rolled_back.jsonl`. A collective that does not complete within
`parallel.timeout_s` (a hung or dead rank) stops the run with an error saying so.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
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
from lctrain.train.launch import validate_layout
from lctrain.train.metrics import MetricsLogger, device_peak_flops, peak_memory_bytes
from lctrain.train.optim import lr_at
from lctrain.train.zero import autocast_for, build_engine, read_full_state


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


_COMM_FAILURE = ("timed out", "timeout", "connection reset", "connection closed", "closed by peer", "broken pipe",
                 "connection refused", "socket closed")


def _comm_failure(e: BaseException) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in _COMM_FAILURE)


def _fault_injection() -> Optional[tuple]:
    """`LCTRAIN_FAULT=kill:STEP:RANK` (SIGKILL itself) or `hang:STEP:RANK[:SECONDS]` (stop answering
    collectives): fault drills and tests. Fires during step STEP, after its backward, on global rank
    RANK, in the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT = 0)."""
    raw = os.environ.get("LCTRAIN_FAULT")
    if not raw or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) != 0:
        return None
    parts = raw.split(":")
    try:
        action, step, rank = parts[0], int(parts[1]), int(parts[2])
        seconds = float(parts[3]) if len(parts) > 3 else 3600.0
    except (IndexError, ValueError):
        raise ConfigError("LCTRAIN_FAULT", f"expected kill:STEP:RANK or hang:STEP:RANK[:SECONDS], got {raw!r}") from None
    if action not in ("kill", "hang"):
        raise ConfigError("LCTRAIN_FAULT", f"unknown action {action!r} (kill or hang)")
    return action, step, rank, seconds


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Optional[str] = None, resume: str = "auto",
                 log: Callable[[str], None] = print):
        self.recipe = recipe
        self.run_dir = run_dir or recipe.run_dir
        self.resume = resume
        self.device = pick_device(recipe)
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            world = 1                  # init_parallel reports the bad value
        validate_layout(recipe, world)
        self._fault = _fault_injection()
        self.pc = init_parallel(recipe.parallel, self.device.type)
        self._log = log
        t = recipe.train
        self.global_batch = t.batch_size * t.grad_accum * self.pc.dp_size     # sequences per step
        self.tokens_per_step = self.global_batch * t.seq_len
        self.engine = None

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
        if self.recipe.train.compile:
            model.compile_blocks()
        return model

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, engine, state: TrainState):
        tmp = None
        if self.pc.is_main:
            tmp = ckpt.staging_dir(self.run_dir, state.step)
        tmp = self.pc.broadcast_object(tmp)
        ckpt.save_rng(tmp, self.pc.rank)
        engine.save(tmp)
        if self.pc.is_main:
            ckpt.write_state(tmp, {**state.to_dict(), **ckpt.host_rng_state(), "world_size": self.pc.world_size,
                                   "dp_size": self.pc.dp_size, "sp_size": self.pc.sp_size,
                                   "global_batch": self.global_batch, "seq_len": self.recipe.train.seq_len,
                                   "zero_stage": engine.zero_stage, "format": engine.format})
        self.pc.barrier()
        if self.pc.is_main:
            final = ckpt.publish(tmp, self.recipe.checkpoint.keep_last)
            self.log(f"checkpoint saved: {final}")
        self.pc.barrier()

    def _check_compatible(self, path: str, st: dict):
        t = self.recipe.train
        if "seq_len" in st and st["seq_len"] != t.seq_len:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written with train.seq_len={st['seq_len']}, this run has {t.seq_len}: resume "
                f"with the same sequence length, or start a new run dir (lctrain export makes a single-file model)")
        if "global_batch" in st and st["global_batch"] != self.global_batch:
            per = t.batch_size * self.pc.dp_size
            hint = (f" (here: --set train.grad_accum={st['global_batch'] // per})" if st["global_batch"] % per == 0 else "")
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written with a global batch of {st['global_batch']} sequences, this run has "
                f"{self.global_batch} (batch_size x grad_accum x dp = {t.batch_size} x {t.grad_accum} x "
                f"{self.pc.dp_size}): resume with the same global batch{hint}, or start a new run dir")

    def _load(self, path: str, engine) -> tuple[TrainState, str]:
        """Restore model, optimizer, RNG and data position; returns the state and how it was loaded."""
        st = ckpt.read_state(path)
        self._check_compatible(path, st)
        fmt = st.get("format", "torch")
        saved_stage = int(st.get("zero_stage", 0)) if fmt == "deepspeed" else 0
        saved_world = int(st.get("world_size", 1))
        if fmt not in ("torch", "deepspeed"):
            raise ckpt.CheckpointError(f"checkpoint {path}: unknown format {fmt!r}")
        if fmt == engine.format == "torch" or (fmt == engine.format == "deepspeed" and saved_world == self.pc.world_size
                                               and saved_stage == engine.zero_stage):
            engine.load(path)
            how = "native"
        else:
            adam_steps = int(st.get("step", 0)) - int(st.get("skipped_steps", 0))
            full = read_full_state(path, fmt, engine.layout, adam_steps, self.pc)
            engine.load_full(full)
            how = (f"converted from zero_stage={saved_stage} on {saved_world} ranks to zero_stage={engine.zero_stage} "
                   f"on {self.pc.world_size}")
        same_layout = (saved_world == self.pc.world_size and st.get("dp_size", 1) == self.pc.dp_size
                       and st.get("sp_size", 1) == self.pc.sp_size)
        if same_layout:
            ckpt.load_rng(path, self.pc.rank)
        else:   # a rank that did not exist takes rank 0's torch RNG state
            own = os.path.isfile(os.path.join(path, f"rng_rank{self.pc.rank}.pt"))
            ckpt.load_rng(path, self.pc.rank if own else 0)
        ckpt.set_host_rng_state(st)
        return TrainState(**{k: st[k] for k in TrainState().to_dict()}), how

    def _roll_back_metrics(self, step: int) -> list[int]:
        """Move records of steps after `step` (work lost in a crash, redone now) out of metrics.jsonl."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not self.pc.is_main or not os.path.isfile(path):
            return []
        keep, drop, dropped = [], [], []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:       # a record cut by the crash
                    drop.append(line if line.endswith("\n") else line + "\n")
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                    drop.append(line)
                    dropped.append(rec["step"])
                else:
                    keep.append(line)
        if drop:
            with open(os.path.join(self.run_dir, "metrics.rolled_back.jsonl"), "a") as f:
                f.writelines(drop)
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        return dropped

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model, val: PackedSequences) -> float:
        t = self.recipe.train
        model.eval()
        # val_batches micro-batches per data-parallel rank: the same sequences for every layout with the
        # same global batch (batch_size x dp), which is what resume and layout comparisons keep fixed
        n = min(len(val), t.val_batches * t.batch_size * self.pc.dp_size)
        ids = list(range(self.pc.dp_rank, n, self.pc.dp_size))
        total = torch.zeros(2, dtype=torch.float64)
        starts = list(range(0, len(ids), t.batch_size))
        # ZeRO-3 gathers parameters in every forward, across all ranks: every rank runs as many forwards
        # as the busiest one (extra ones on a repeated batch, not counted).
        rounds = len(starts)
        if self.recipe.parallel.zero_stage == 3 and self.pc.distributed:
            per_rank = -(-n // self.pc.dp_size)
            rounds = -(-per_rank // t.batch_size)
        for i in range(rounds):
            counted = i < len(starts)
            sel = ids[starts[i]:starts[i] + t.batch_size] if counted else (ids[:t.batch_size] or [0] * t.batch_size)
            batch = self._shard(val.batch(sel))
            with autocast_for(self.recipe, self.device):
                out = model(batch["input_ids"], SeqContext(doc_start=batch["doc_start"], ops=self.pc.seq_ops))
            if counted:
                total[0] += token_loss_sum(out.logits, batch["labels"]).double().cpu()
                total[1] += batch["labels"].numel()
        model.train()
        total = self.pc.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def _shard(self, batch: dict) -> dict:
        return {k: self.pc.shard_sequence(v.to(self.device), dim=1) for k, v in batch.items()}

    def _inject_fault(self, step: int, stop: "_StopFlag"):
        if not self._fault or self._fault[1] != step or self._fault[2] != self.pc.rank:
            return
        action, _, _, seconds = self._fault
        if action == "kill":
            import sys
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.signum:
            time.sleep(0.05)

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        r, t = self.recipe, self.recipe.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        source = None
        if self.resume != "never":
            source = ckpt.latest_checkpoint(self.run_dir) if self.resume == "auto" else ckpt.resolve_checkpoint(self.resume)
        if source:          # an incompatible checkpoint fails before any work (and before the run dir is touched)
            self._check_compatible(source, ckpt.read_state(source))
        data = self._prepare_data()
        self._prepare_run_dir(data)
        model = self._build_model(data.tokenizer.vocab_size)
        info = model.summary(t.seq_len)
        self.engine = build_engine(model, r, self.pc, self.device)
        try:
            return self._train(self.engine, data, info, source)
        finally:
            self.engine.close()

    def _train(self, engine, data: PreparedData, info: dict, source: Optional[str]) -> dict:
        r, t = self.recipe, self.recipe.train
        state = TrainState()
        how = None
        if source:
            state, how = self._load(source, engine)
            self.log(f"resumed from {source} at step {state.step}" + ("" if how == "native" else f" ({how})"))
        order = DataOrder(len(data.train), r.seed)
        if data.val is None:
            self.log("no validation sequences (data.val_fraction too small for this corpus): val_loss is not reported")
        zero = f", ZeRO-{engine.zero_stage} (DeepSpeed)" if engine.zero_stage else ""
        self.log(f"model {r.model.arch}: {info['params'] / 1e6:.2f}M params ({info['non_embedding_params'] / 1e6:.2f}M "
                 f"non-embedding), {self.tokens_per_step:,} tokens/step, budget {self.tokens_per_step * t.steps:,} tokens "
                 f"({t.steps} steps), world {self.pc.world_size} = dp {self.pc.dp_size} x sp {self.pc.sp_size}{zero}, "
                 f"device {self.device}, data {len(data.train):,} train sequences of {t.seq_len}")
        rolled_back = self._roll_back_metrics(state.step)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        first_extra = {}
        if source or restart or rolled_back:
            first_extra = {"resumed_from": source, "restart": restart}
            if how and how != "native":
                first_extra["resume_conversion"] = how
            if rolled_back:
                first_extra["rolled_back_steps"] = sorted(set(rolled_back))
                self.log(f"steps {min(rolled_back)}..{max(rolled_back)} after the last checkpoint are redone "
                         f"(their records moved to metrics.rolled_back.jsonl)")
        metrics = MetricsLogger(self.run_dir, r, self.pc.is_main, t.steps, state.step)
        peak = device_peak_flops(self.device)
        mb, dp = t.batch_size, self.pc.dp_size
        last_val = None
        t_last, tok_last = time.perf_counter(), state.tokens
        saved_at = state.step if source else -1
        status, step_loss = "completed", float("nan")
        with _StopFlag() as stop:
            try:
                while state.step < t.steps:
                    lr = lr_at(state.step, t.steps, r.optim)
                    loss_sum = torch.zeros((), dtype=torch.float64)
                    aux_sum = torch.zeros((), dtype=torch.float64)
                    data_start = state.consumed
                    for micro in range(t.grad_accum):
                        first = state.consumed + (micro * dp + self.pc.dp_rank) * mb
                        batch = self._shard(data.train.batch(order.indices(first, mb)))
                        out = engine.forward(batch["input_ids"], SeqContext(doc_start=batch["doc_start"], ops=self.pc.seq_ops))
                        lsum = token_loss_sum(out.logits, batch["labels"])
                        loss = lsum / self.tokens_per_step
                        if t.aux_loss_weight and out.aux_loss.requires_grad:
                            loss = loss + t.aux_loss_weight * out.aux_loss / (t.grad_accum * self.pc.world_size)
                        lsum_d, aux_d = lsum.detach().double().cpu(), out.aux_loss.detach().double().cpu()
                        engine.backward(loss, math.isfinite(float(lsum_d)) and math.isfinite(float(aux_d)),
                                        micro == t.grad_accum - 1)
                        loss_sum += lsum_d
                        aux_sum += aux_d
                    self._inject_fault(state.step + 1, stop)
                    engine.reduce_grads()
                    totals = self.pc.all_reduce(torch.stack([loss_sum, aux_sum, torch.tensor(float(stop.signum), dtype=torch.float64)]))
                    step_loss = float(totals[0]) / self.tokens_per_step
                    grad_norm, ok = engine.step(lr, math.isfinite(step_loss))
                    if ok:
                        state.nonfinite_in_row = 0
                    else:
                        state.nonfinite_in_row += 1
                        state.skipped_steps += 1
                        self.log(f"step {state.step + 1}: non-finite loss/gradient ({step_loss}), step skipped "
                                 f"({state.nonfinite_in_row} in a row)")
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
                        last_val = self.validate(engine.module, data.val)
                    if (state.step % t.log_every == 0 or is_last or (t.val_every and state.step % t.val_every == 0)
                            or first_extra):
                        now = time.perf_counter()
                        tps = (state.tokens - tok_last) / max(now - t_last, 1e-9)
                        t_last, tok_last = now, state.tokens
                        rec = {"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": state.tokens, "tokens_per_s": tps,
                               "peak_mem_bytes": peak_memory_bytes(self.device), "skipped_steps": state.skipped_steps,
                               "data_start": data_start, "consumed": state.consumed}
                        if float(totals[1]):
                            rec["aux_loss"] = float(totals[1]) / (t.grad_accum * self.pc.world_size)
                        if peak:
                            rec["mfu"] = tps / self.pc.world_size * info["flops_per_token"] / peak
                        if last_val is not None and (is_last or (t.val_every and state.step % t.val_every == 0)):
                            rec["val_loss"] = last_val
                        comm = self.pc.pop_comm_bytes()
                        rec.update({f"comm_bytes/{k}": v for k, v in comm.items()})
                        rec.update(first_extra)
                        first_extra = {}
                        metrics.log(rec)
                        metrics.progress(state.step, step_loss, tps)
                        if not metrics.bar:
                            self.log(f"step {state.step}/{t.steps} loss {step_loss:.4f} lr {lr:.2e} "
                                     f"grad_norm {grad_norm:.3f} {tps:,.0f} tok/s"
                                     + (f" val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""))
                    every = r.checkpoint.every
                    if (every and state.step % every == 0) or is_last:
                        self.save(engine, state)
                        saved_at = state.step
                    if float(totals[2]) and not is_last:
                        if saved_at != state.step:
                            self.save(engine, state)
                        status = "interrupted"
                        self.log(f"interrupted by signal at step {state.step}: checkpoint saved; run the same command to resume")
                        break
            except TrainingError:
                raise
            except RuntimeError as e:
                if self.pc.distributed and _comm_failure(e):
                    metrics.close()
                    detail = " ".join(str(e).split())[:200]
                    if "timed out" in detail.lower() or "timeout" in detail.lower():
                        raise TrainingError(
                            f"collective timed out at step {state.step + 1}: no answer from another rank within "
                            f"parallel.timeout_s={r.parallel.timeout_s:g}s (a rank hung or is far behind); the last "
                            f"checkpoint is kept ({detail})") from None
                    raise TrainingError(
                        f"collective failed at step {state.step + 1}: lost the connection to another rank (it died or "
                        f"was killed); the last checkpoint is kept ({detail})") from None
                raise
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
