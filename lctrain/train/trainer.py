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

Start-up order (nothing in the run directory changes unless every check passes): take the run
directory's lock (`rundir.RunLock`, one trainer per directory); pick the checkpoint to resume, verify
it against its manifest, vet its pickles and check it against the recipe (model fields, seed, sequence
length, global batch, what a new `train.steps` does to the LR schedule); prepare data; build the model
and engine; load the checkpoint. Only then: leftovers of killed saves/prunes/conversions are removed,
superseded contents are moved aside, and recipe.yaml / tokenizer.model are written.
A checkpoint save that hits a full disk stops with one line naming the path; the previous checkpoint
is intact (saves are staged and renamed).
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
from lctrain.train.launch import signal_name, validate_layout
from lctrain.train.metrics import MetricsLogger, device_peak_flops, peak_memory_bytes
from lctrain.train import rundir
from lctrain.train.optim import lr_at, steps_change_problem, wsd_decay_start
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
                 log: Optional[Callable[[str], None]] = None, fresh: bool = False):
        self.recipe = recipe
        self.run_dir = run_dir or recipe.run_dir
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) and (fresh or resume == "never"):
            # a torchrun restart: the first attempt made the fresh start, this one continues it
            fresh, resume = False, "auto"
        self.resume = resume
        self.fresh = fresh
        if fresh and resume not in ("auto", "never"):
            inside = os.path.abspath(resume).startswith(os.path.abspath(self.run_dir) + os.sep)
            if inside:
                raise ConfigError("--fresh", f"moves {self.run_dir}'s contents aside: it cannot resume from "
                                             f"{resume} inside it (copy that checkpoint elsewhere first)")
        self.device = pick_device(recipe)
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            world = 1                  # init_parallel reports the bad value
        validate_layout(recipe, world)
        self._fault = _fault_injection()
        self.pc = init_parallel(recipe.parallel, self.device.type)
        self._log = log                  # None: flushed lines on stdout, through the progress bar if drawn
        self._metrics: Optional[MetricsLogger] = None
        t = recipe.train
        self.global_batch = t.batch_size * t.grad_accum * self.pc.dp_size     # sequences per step
        self.tokens_per_step = self.global_batch * t.seq_len
        self.engine = None

    def log(self, msg: str):
        if not self.pc.is_main:
            return
        if self._metrics is not None:
            self._metrics.write(msg)
        elif self._log is not None:
            self._log(msg)
        else:
            print(msg, flush=True)

    # --- setup ----------------------------------------------------------------------------------
    def _prepare_data(self) -> PreparedData:
        r = self.recipe
        if r.train.init_from and r.tokenizer.path is None:    # continued pretraining: the source's token ids
            from lctrain.data.dataset import cache_root
            from lctrain.interop.init import source_tokenizer
            r.tokenizer.path = source_tokenizer(r.train.init_from, os.path.join(cache_root(r.data), "tokenizers"))
        if self.pc.is_main:
            data = prepare_data(self.recipe, self.log)
        self.pc.barrier()
        if not self.pc.is_main:
            data = prepare_data(self.recipe, lambda m: None)
        return data

    def _prepare_run_dir(self, data: PreparedData, plan: dict):
        """Touch the run directory, after every start-up check passed (rank 0)."""
        if not self.pc.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._clean_leftovers()
        if plan.get("move_all"):
            dest = rundir.move_aside(self.run_dir)
            self.log(f"--fresh: the previous contents of {self.run_dir} moved to {dest}")
        elif plan.get("move_ckpts"):
            dest = rundir.move_aside(self.run_dir, checkpoints=plan["move_ckpts"])
            self.log(f"resuming from an earlier checkpoint: {len(plan['move_ckpts'])} later checkpoint(s) moved to {dest}")
        self._lock.record_holder()
        with open(os.path.join(self.run_dir, "recipe.yaml"), "w") as f:
            f.write(dump_recipe(self.recipe))
        dst = os.path.join(self.run_dir, "tokenizer.model")
        if os.path.abspath(data.tokenizer.path) != os.path.abspath(dst):
            shutil.copyfile(data.tokenizer.path, dst)

    def _clean_leftovers(self):
        """Rank 0, holding the lock: remove what killed saves, prunes and conversions left behind."""
        stale = ckpt.clean_stale(self.run_dir)
        if stale:
            self.log(f"removed {len(stale)} leftover(s) of killed saves/prunes/conversions: {', '.join(stale)}")

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
    def save(self, engine, state: TrainState, keep: bool = False):
        """Stage, hash (manifest) and publish a checkpoint; `keep`: pruning never removes it."""
        tmp = None
        if self.pc.is_main:
            tmp = ckpt.staging_dir(self.run_dir, state.step)
        tmp = self.pc.broadcast_object(tmp)
        try:
            ckpt.save_rng(tmp, self.pc.rank)
            engine.save(tmp)
            if self.pc.is_main:
                ckpt.write_state(tmp, {**state.to_dict(), **ckpt.host_rng_state(), "world_size": self.pc.world_size,
                                       "dp_size": self.pc.dp_size, "sp_size": self.pc.sp_size,
                                       "global_batch": self.global_batch, "seq_len": self.recipe.train.seq_len,
                                       "total_steps": self.recipe.train.steps, "keep": keep, "seed": self.recipe.seed,
                                       "zero_stage": engine.zero_stage, "format": engine.format})
                with open(os.path.join(tmp, "recipe.yaml"), "w") as f:
                    f.write(dump_recipe(self.recipe))
            self.pc.barrier()
            if self.pc.is_main:
                ckpt.write_manifest(tmp)
        except (OSError, RuntimeError) as e:
            if not ckpt.no_space(e, tmp):
                raise
            prev = ckpt.latest_checkpoint(self.run_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f"no space left on device while saving checkpoint {tmp}: "
                                + (f"the previous checkpoint {prev} is intact; " if prev else "")
                                + "free space and run the same command to resume") from None
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
        if "seed" in st and st["seed"] != self.recipe.seed:
            raise ConfigError("seed", f"{self.recipe.seed} here, {st['seed']} when checkpoint {path} was written: the "
                                      f"data order is a function of the seed; resume with seed {st['seed']}")
        if "total_steps" in st and st["total_steps"] != t.steps and st["step"] < t.steps:
            ok, line = steps_change_problem(st["step"], st["total_steps"], t.steps, self.recipe.optim)
            if not ok:
                raise ConfigError("train.steps", line)
            self.log(line)

    def _old_recipe(self, path: str) -> Optional[dict]:
        """The recipe that wrote checkpoint `path` (its own copy, else its run dir's), as a dict."""
        import yaml
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        for f in (os.path.join(path, "recipe.yaml"), os.path.join(root, "recipe.yaml")):
            if os.path.isfile(f):
                try:
                    with open(f) as fh:
                        d = yaml.safe_load(fh)
                except (OSError, yaml.YAMLError):
                    continue
                return d if isinstance(d, dict) else None
        return None

    def _check_shapes(self, path: str, model):
        """The checkpoint's weights (model.pt, memory-mapped) must fit the recipe's model; a mismatch is
        one line naming the model.* field that changed (from the recipe that wrote the checkpoint)."""
        if not os.path.isfile(os.path.join(path, "model.pt")):
            return
        saved = ckpt.tensor_shapes(path, "model.pt")
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = next((k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)), None)
        if bad is None:
            return
        what = f"{bad}: {saved.get(bad, 'absent')} in the checkpoint, {mine.get(bad, 'absent')} in this recipe's model"
        old = self._old_recipe(path)
        diffs = _diff_fields((old or {}).get("model"), self.recipe.to_dict()["model"], "model") if old else []
        diffs = [d for d in diffs if not (d[0] == "model.vocab_size" and not self.recipe.model.vocab_size)]
        if diffs:
            field, here, there = diffs[0]
            raise ConfigError(field, f"{here} here, {there} when checkpoint {path} was written, so its weights do not fit "
                                     f"({what}); resume with the run's recipe, or start anew (--fresh or another --run-dir)")
        raise ckpt.CheckpointError(f"checkpoint {path}: its weights do not fit this recipe's model ({what})")

    def _plan_start(self) -> tuple[Optional[str], dict]:
        """Rank 0: the checkpoint to resume (verified, vetted, compatible) and what to move aside.
        Reads only; raises with one line on any problem."""
        d = self.run_dir
        plan: dict = {}
        mine = ckpt.list_checkpoints(d)
        held = rundir.used(d) if os.path.isdir(d) else None
        if self.fresh:
            extra = [x for x in os.listdir(d) if x not in (rundir.LOCK, rundir.SUPERSEDED)] if os.path.isdir(d) else []
            plan["move_all"] = bool(extra)
            source = None if self.resume in ("auto", "never") else ckpt.resolve_checkpoint(self.resume, check=False)
        elif self.resume == "never":
            if held:
                raise ckpt.CheckpointError(
                    f"run dir {d} already holds a run ({held}): --resume never would mix its checkpoints with the new "
                    f"run's; resume it (--resume auto), or pass --fresh to move its contents to {d}/superseded/")
            source = None
        elif self.resume == "auto":
            source = mine[-1] if mine else None
        else:
            source = ckpt.resolve_checkpoint(self.resume, check=False)
            if os.path.dirname(os.path.abspath(source)) == os.path.abspath(ckpt.checkpoint_root(d)):
                plan["move_ckpts"] = [c for c in mine if ckpt.step_of(c) > ckpt.step_of(source)]
            elif held:
                raise ckpt.CheckpointError(
                    f"run dir {d} already holds a run ({held}): resuming it from {source} would mix two runs; pass "
                    f"--fresh to move its contents to {d}/superseded/ first, or use another --run-dir")
        if source:
            try:
                plan["verified"] = ckpt.check_checkpoint(source)
            except ckpt.CheckpointError as e:
                if self.resume != "auto":
                    raise
                prev = next((c for c in reversed(mine[:-1]) if _checks(c)), None)
                raise ckpt.CheckpointError(f"{e}; refusing to resume from it" + (
                    f" (the previous checkpoint verifies: --resume {prev} continues from it)" if prev else "")) from None
            self._check_compatible(source, ckpt.read_state(source))
        return source, plan

    def _load(self, path: str, engine) -> tuple[TrainState, str]:
        """Restore model, optimizer, RNG and data position; returns the state and how it was loaded."""
        st = ckpt.read_state(path)        # checked against the recipe in _plan_start
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
        if self.recipe.train.num_threads:
            torch.set_num_threads(self.recipe.train.num_threads)
        self._lock, error = None, None
        if self.pc.is_main:
            try:
                self._lock = rundir.RunLock(self.run_dir).acquire()
            except (rundir.RunDirLocked, OSError) as e:
                error = e
        self._raise_everywhere(error)
        ok = False
        try:
            result = self._run_locked()
            ok = True
            return result
        finally:
            if self._lock:
                self._lock.release(failed=not ok)

    def _raise_everywhere(self, error: Optional[BaseException]):
        """Rank 0's start-up error, raised on every rank (the same one line)."""
        box = None if error is None else (isinstance(error, ConfigError), str(error))
        box = self.pc.broadcast_object(box)
        if error is not None:
            raise error
        if box is not None:
            is_config, text = box
            if is_config:
                raise ConfigError("", text)
            raise ckpt.CheckpointError(text)

    def _run_locked(self) -> dict:
        r, t = self.recipe, self.recipe.train
        plan, error = None, None
        if self.pc.is_main:
            try:
                plan = self._plan_start()
            except (ConfigError, ckpt.CheckpointError, OSError) as e:
                error = e
        self._raise_everywhere(error)
        source, plan = self.pc.broadcast_object(plan)
        if source and not plan.get("verified"):
            self.log(f"checkpoint {source} has no manifest (written by an older lctrain): its content is not verified")
        data = self._prepare_data()
        model = self._build_model(data.tokenizer.vocab_size)
        if source:
            self._check_shapes(source, model)
            step = int(ckpt.read_state(source)["step"])
            if step >= t.steps:        # every check passed: a rerun of a finished run trains nothing
                if self.pc.is_main:
                    self._clean_leftovers()
                return self._already_complete(source, step)
        elif t.init_from:                     # continued pretraining: source weights, fresh optimizer
            from lctrain.interop.init import load_init_weights      # (a mismatch fails before the run dir is touched)
            self.log(f"initialized from {load_init_weights(model, t.init_from)} (fresh optimizer)")
        info = model.summary(t.seq_len)
        self.engine = build_engine(model, r, self.pc, self.device)
        try:
            state, how = self._load(source, self.engine) if source else (TrainState(), None)
            self._prepare_run_dir(data, plan)
            return self._train(self.engine, data, info, source, state, how)
        finally:
            self.engine.close()

    def _train(self, engine, data: PreparedData, info: dict, source: Optional[str], state: TrainState,
               how: Optional[str]) -> dict:
        r, t = self.recipe, self.recipe.train
        if source:
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
        metrics = MetricsLogger(self.run_dir, r, self.pc.is_main, t.steps, state.step, emit=self._log)
        self._metrics = metrics
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
                        metrics.progress(rec)
                    every = r.checkpoint.every
                    decay_start = r.optim.schedule == "wsd" and state.step == wsd_decay_start(t.steps, r.optim)
                    if (every and state.step % every == 0) or is_last or decay_start:
                        self.save(engine, state, keep=decay_start)
                        saved_at = state.step
                    if float(totals[2]) and not is_last:
                        if saved_at != state.step:
                            self.save(engine, state)
                        status = "interrupted"
                        signum = stop.signum or int(float(totals[2]))      # the signal may have reached another rank
                        self.log(f"interrupted by {signal_name(signum)} at step {state.step}: checkpoint saved; "
                                 f"run the same command to resume")
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
        self._metrics = None
        out = {"status": status, "step": state.step, "loss": step_loss if state.step else None,
               "val_loss": last_val, "run_dir": self.run_dir, **info}
        if status == "interrupted":
            out["signal"] = signum
        return out

    def _already_complete(self, source: str, step: int) -> dict:
        """A rerun of a finished run: nothing to train, nothing written; the last logged losses."""
        t = self.recipe.train
        last = {}
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.pc.is_main and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and rec.get("step") == step:
                        last.update(rec)
        more = ("" if step == t.steps else f" (train.steps={t.steps} is below the checkpoint's step)")
        self.log(f"run already complete: {self.run_dir} is at step {step}{more}, checkpoint {source}; nothing to "
                 f"train (to continue training, raise train.steps)")
        return {"status": "already_complete", "step": step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
                "run_dir": self.run_dir}


def train(recipe: Recipe, run_dir: Optional[str] = None, resume: str = "auto",
          log: Optional[Callable[[str], None]] = None, fresh: bool = False) -> dict:
    """Train (or resume) `recipe` in `run_dir`; `fresh`: start from step 0, moving an existing run's
    contents to RUN/superseded/<time>/ (module docstring: start-up order and checks)."""
    trainer = Trainer(recipe, run_dir, resume, log, fresh)
    try:
        return trainer.run()
    finally:
        trainer.pc.shutdown()


def _checks(path: str) -> bool:
    try:
        return ckpt.check_checkpoint(path) or True
    except ckpt.CheckpointError:
        return False


def _diff_fields(old, new, path: str) -> list[tuple[str, object, object]]:
    """(dotted field, new value, old value) for every leaf that differs (keys only one side has: skipped)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in new if k in old for d in _diff_fields(old[k], new[k], f"{path}.{k}")]
    return [] if old == new else [(path, new, old)]
