"""Run-directory ownership: one trainer per run directory, and fresh starts that never mix runs.

Lock. `RUN/.lock` is held with `fcntl.flock(LOCK_EX | LOCK_NB)` by the trainer's global rank 0 for the
whole run (other ranks of the same job are covered by it; a second job's rank 0 fails to take it and
every rank of that job exits with the same line). The kernel drops the lock when the process dies,
SIGKILL included, so a crashed run never leaves a stale lock, and a torchrun `--max-restarts` restart
(which starts new worker processes after the old ones exited) takes it again. After the start-up
checks pass, the holder writes its pid, host and start time into the file, which a refused trainer
quotes; the lock itself is the flock, never the file's content. flock is local to a host unless the
file system propagates it (NFS v4, Lustre with `-o flock`).

Fresh starts. `--resume never` in a directory that already holds a run (checkpoints or metrics) is
refused; `--fresh` moves the old contents to `RUN/superseded/<UTC time>/` first. Resuming from an
older checkpoint of the same run moves the later checkpoints there too, so the next automatic resume
cannot pick up the abandoned branch.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from lctrain.train import checkpoint as ckpt

LOCK = ".lock"
SUPERSEDED = "superseded"


class RunDirLocked(RuntimeError):
    pass


class RunLock:
    """An exclusive, non-blocking flock on RUN/.lock (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self.fd: Optional[int] = None
        self.created_dir = self.created_lock = False

    def acquire(self) -> "RunLock":
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir)
            self.created_dir = True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR | os.O_CLOEXEC), False
                except FileNotFoundError:       # removed by a refused start in between: create it
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirLocked(f"run dir {self.run_dir} is in use by another trainer ({holder(self.path)}); "
                                       f"one trainer per run directory: wait for it, stop it, or use another "
                                       f"--run-dir") from None
                raise
            try:       # a refused start removes the lock file it created: locked a removed file? retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd, self.created_lock = fd, created
        return self

    def record_holder(self):
        """Write who holds the lock (after the start-up checks: a refused start changes nothing)."""
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def release(self, failed: bool = False):
        if self.fd is None:
            return
        if failed and self.created_lock:         # a start that failed its checks leaves the directory as it was
            os.remove(self.path)
            if self.created_dir and not os.listdir(self.run_dir):
                os.rmdir(self.run_dir)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def holder(path: str) -> str:
    """'pid P on host H since T' from a lock file, validated; a plain phrase when it says nothing usable."""
    try:
        with open(path) as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        info = None
    if not (isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)):
        return "holder still starting up, pid not yet recorded"
    return f"pid {info['pid']} on host {info['host']}" + (f" since {info['started']}" if isinstance(info.get("started"), str) else "")


def used(run_dir: str) -> Optional[str]:
    """What shows that `run_dir` already holds a run (None if nothing does)."""
    found = ckpt.list_checkpoints(run_dir)
    if found:
        return f"checkpoints up to step {ckpt.step_of(found[-1])}"
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return "a metrics.jsonl"
    return None


def move_aside(run_dir: str, names: Optional[list[str]] = None, checkpoints: Optional[list[str]] = None) -> str:
    """Move `names` (default: everything but the lock and earlier superseded runs) and the checkpoint
    dirs `checkpoints` into RUN/superseded/<UTC time>/; returns that directory. Renames only."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = os.path.join(run_dir, SUPERSEDED, stamp)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(run_dir, SUPERSEDED, f"{stamp}-{n}")
    os.makedirs(dest)
    if names is None and checkpoints is None:
        names = [x for x in os.listdir(run_dir) if x not in (LOCK, SUPERSEDED)]
    for x in names or []:
        os.replace(os.path.join(run_dir, x), os.path.join(dest, x))
    if checkpoints:
        os.makedirs(os.path.join(dest, ckpt.CKPT_DIR))
        for c in checkpoints:
            os.replace(c, os.path.join(dest, ckpt.CKPT_DIR, os.path.basename(c)))
    return dest
