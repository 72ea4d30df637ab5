"""Progress with an ETA for long evaluations and studies (`lctrain eval length | passkey | study`).

On a terminal one line is redrawn in place (carriage return); elsewhere (SLURM, nohup, a pipe) a plain
line is printed at most every `every_s` seconds and at the end, so logs show steady progress.
ETA = elapsed / done x remaining work (work in the caller's units, e.g. tokens)."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def _hms(s: float) -> str:
    s = int(max(0, round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: float, label: str, *, unit: str = "tok", every_s: float = 15.0,
                 log: Optional[Callable[[str], None]] = None, stream=None, tty: Optional[bool] = None):
        self.total, self.label, self.unit, self.every_s = max(float(total), 1e-9), label, unit, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log = log
        self.done = 0.0
        self.t0 = time.perf_counter()
        self.last = -1e9
        self.drawn = False

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        frac = min(self.done / self.total, 1.0)
        eta = el / self.done * (self.total - self.done) if self.done > 0 else float("nan")
        rate = self.done / el if el > 0 else 0.0
        return (f"{self.label}: {100 * frac:5.1f}% ({self.done:,.0f}/{self.total:,.0f} {self.unit}, "
                f"{rate:,.0f} {self.unit}/s) elapsed {_hms(el)} ETA {_hms(eta) if eta == eta else '?'}")

    def update(self, n: float = 1.0) -> None:
        self.done += n
        now = time.perf_counter()
        end = self.done >= self.total
        if self.tty:
            if now - self.last >= 0.5 or end:
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
                self.drawn, self.last = True, now
        elif now - self.last >= self.every_s or end:
            self._plain(self.line())
            self.last = now

    def _plain(self, text: str) -> None:
        if self.log is not None:
            self.log(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the redrawn line (a terminal) so the next message starts on its own line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
