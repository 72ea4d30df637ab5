"""Run a function in N gloo worker processes with a hard timeout; a failing worker fails the caller
with its traceback instead of hanging it.

    results = run_workers(fn, world_size, *args, timeout=120)   # fn(rank, world_size, *args) -> picklable

Workers get torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and one
CPU thread, and end as DESIGN.md §5 says (destroy the process group, flush, `os._exit`) so gloo's
exit-time abort cannot turn a good run into a failure. `fn` must be a module-level function.
Processes come from a forkserver that has torch and lctrain preloaded, so a worker starts in
well under a second instead of re-importing torch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo: imported lazily by torch.utils.checkpoint (~4 s), once here instead of per worker
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "lctrain.models",
                                     "lctrain.parallel"])
    return _CTX


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, args: bytes, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    code = 0
    try:
        import torch
        torch.set_num_threads(1)
        out = fn(rank, world, *pickle.loads(args))
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        pass
    results.close()
    results.join_thread()          # the queue's feeder thread must flush before _exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_workers(fn: Callable, world_size: int, *args, timeout: float = 120.0, grace: float = 5.0) -> list[Any]:
    """`fn(rank, world_size, *args)` in `world_size` processes; returns the results by rank.

    Raises AssertionError with every failing rank's traceback (after `grace` seconds for the
    others to report theirs), or TimeoutError naming the ranks that never reported."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    # Plain pickle (bytes) both ways: through a multiprocessing queue torch would share tensors by
    # file descriptor, which dies with the worker that exits right after sending.
    payload = pickle.dumps(args)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, payload, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_error = None
    try:
        while len(done) < world_size:
            now = time.monotonic()
            if now > deadline or first_error is not None and now > first_error + grace:
                break
            try:
                rank, status, payload = results.get(timeout=0.2)
                done[rank] = (status, payload)
                if status == "error" and first_error is None:
                    first_error = time.monotonic()
            except queue.Empty:
                for r, p in enumerate(procs):   # died without reporting (segfault, os._exit in fn)
                    if r not in done and p.exitcode is not None:
                        done[r] = ("error", f"worker exited with code {p.exitcode} without a result")
                        first_error = first_error or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    errors = {r: payload for r, (status, payload) in sorted(done.items()) if status == "error"}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        raise AssertionError(f"{len(errors)} of {world_size} workers failed:\n{msg}")
    missing = [r for r in range(world_size) if r not in done]
    if missing:
        raise TimeoutError(f"workers {missing} of {world_size} did not finish within {timeout:.0f}s")
    return [pickle.loads(done[r][1]) for r in range(world_size)]
