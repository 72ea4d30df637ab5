"""Run metrics: `metrics.jsonl` (one JSON object per logged step), wandb, and a terminal progress bar."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Optional

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


def interactive(mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


class MetricsLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str, recipe, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.file = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        mode = recipe.logging.wandb
        if mode != "disabled":
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
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float):
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()

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
