"""Run metrics: `metrics.jsonl` (one JSON object per logged step), wandb, and a terminal progress bar."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Callable, Optional

import torch

# Dense bf16 peak FLOP/s per device, for MFU (unknown devices report no MFU).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
               "L40S": 362e12, "4090": 165e12, "B200": 2250e12}


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


MIN_BAR_COLUMNS = 40     # narrower (or zero-width) terminals get plain lines: a bar there shows nothing


def interactive(mode: str) -> bool:
    """Whether to draw a progress bar (on stderr): `logging.progress` on / off, or auto = stderr is a
    terminal at least MIN_BAR_COLUMNS wide (not SLURM/nohup logs, pipes, CI or a zero-width pty)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if os.environ.get("CI") or not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns >= MIN_BAR_COLUMNS
    except (OSError, ValueError, AttributeError):
        return False


def json_safe(obj):
    """`obj` with every non-finite float replaced by None, so `json.dumps(..., allow_nan=False)` writes
    valid JSON (NaN / Infinity are not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_line(obj) -> str:
    return json.dumps(json_safe(obj), allow_nan=False)


def format_duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class MetricsLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing.

    Progress: on a terminal a tqdm bar on stderr, with every message printed through the bar
    (`write`) so neither overwrites the other; elsewhere (SLURM, nohup, pipes) one plain, flushed line
    per logged step with step, loss, tokens/s and the ETA."""

    def __init__(self, run_dir: str, recipe, enabled: bool, total_steps: int, start_step: int,
                 emit: Optional[Callable[[str], None]] = None):
        self.enabled = enabled
        self._emit = emit                 # None: print (through the bar when one is drawn)
        self.file = None
        self.wandb = None
        self.bar = None
        self.total_steps, self.start_step = total_steps, start_step
        self._t0 = time.perf_counter()
        if not enabled:
            return
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        mode = recipe.logging.wandb
        if mode != "disabled":
            # wandb reads its process-wide mode from the environment before init's argument: without this an
            # offline run still resolves and contacts the W&B servers (telemetry), i.e. DNS from a local run.
            os.environ["WANDB_MODE"] = mode
            try:
                import wandb
                self.wandb = wandb.init(project=recipe.logging.project, name=recipe.name, dir=run_dir, mode=mode,
                                        config=recipe.to_dict(), resume="allow", id=_wandb_id(run_dir))
            except Exception as e:  # logging must never kill a run
                print(f"wandb disabled: {str(e).splitlines()[0]}", file=sys.stderr)
        if interactive(recipe.logging.progress):
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict):
        if not self.enabled:
            return
        self.file.write(json_line(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])

    def eta_seconds(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * max(self.total_steps - step, 0)

    def write(self, msg: str):
        """A message line: through the bar on a terminal, else a flushed line on stdout."""
        if not self.enabled:
            return
        if self._emit is not None:
            self._emit(msg)
        elif self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def progress(self, record: dict) -> Optional[str]:
        """Show a logged step: the bar's postfix on a terminal, else one plain line (returned)."""
        if not self.enabled:
            return None
        step, loss, tps = record["step"], record["loss"], record["tokens_per_s"]
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.refresh()
            return None
        eta = self.eta_seconds(step)
        line = (f"step {step}/{self.total_steps} loss {loss:.4f} lr {record['lr']:.2e} "
                f"grad_norm {record['grad_norm']:.3f} {tps:,.0f} tok/s"
                + (f" val_loss {record['val_loss']:.4f}" if record.get("val_loss") is not None else "")
                + (f" ETA {format_duration(eta)}" if eta is not None and step < self.total_steps else ""))
        self.write(line)
        return line

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    path = os.path.join(run_dir, "wandb_id")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    import uuid
    rid = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(rid)
    return rid
