"""Peak resident memory of this process on Linux, for the CPU memory columns of the benchmarks.

`reset_peak()` resets the RSS high-water mark (/proc/self/clear_refs, "5") and returns the current RSS;
`peak()` returns the high-water mark since. Both in bytes."""
from __future__ import annotations


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024       # the file states kB
    return 0


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak() -> int:
    return _status_bytes("VmHWM")
