"""Temp names for files and directories built next to their destination, then renamed into place.

A build killed before its rename (SIGKILL, OOM, node loss) leaves its temp behind; the next build
removes those whose process is gone. The temp name carries the host as well as the PID
(`NAME.tmp-PID@HOST`) because a cache directory may be shared by several machines: a PID is only
checked on the host that owns it, and temps of other hosts are left alone.
"""
from __future__ import annotations

import os
import shutil
import socket


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0; another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: str) -> str:
    """`path.tmp-PID@HOST`: where this process builds `path` before renaming it into place."""
    return f"{path}.tmp-{os.getpid()}@{socket.gethostname()}"


def clean_dead_temps(directory: str) -> list[str]:
    """Remove the `*.tmp-PID@HOST` entries of `directory` left by dead processes of this host; returns
    their names. Entries of live processes (a concurrent build) and of other hosts are kept."""
    if not os.path.isdir(directory):
        return []
    host, removed = socket.gethostname(), []
    for name in sorted(os.listdir(directory)):
        _, sep, tail = name.rpartition(".tmp-")
        pid, at, owner = tail.partition("@")
        if not (sep and at and pid.isdigit() and owner == host) or pid_alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(name)
        except OSError:
            pass
    return removed
