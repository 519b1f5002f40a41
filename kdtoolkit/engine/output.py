"""Console progress (rank 0 only). The metrics file is ``kdtoolkit.engine.metrics``."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class ProgressBar:
    """A one-line progress bar on a terminal; silent otherwise (``enabled=False``).

    ``postfix`` is a callable so that values needing a device sync are only computed when a line is
    actually drawn (at most every ``interval`` seconds).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool, stream: TextIO = sys.stderr, interval: float = 0.5):
        self.total, self.desc, self.enabled, self.stream, self.interval = total, desc, enabled, stream, interval
        self.n = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, postfix=None) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < self.interval and self.n < self.total:
            return
        self._last = now
        self._draw(postfix() if postfix else "")

    def _draw(self, postfix: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        frac = self.n / self.total if self.total else 1.0
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        eta_s = f"{eta:4.0f}s" if math.isfinite(eta) else "   ?"
        self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:6.1f} it/s eta {eta_s} {postfix}\x1b[K")
        self.stream.flush()

    def close(self, postfix=None) -> None:
        if self.enabled:
            self._draw(postfix() if postfix else "")
            self.stream.write("\n")
            self.stream.flush()


def progress_enabled(setting: str, stream: TextIO = sys.stderr) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())
