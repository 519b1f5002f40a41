"""Console progress (bar or periodic lines), the run's console log and the per-epoch metrics file (rank 0 only)."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO


#: seconds between progress lines when the output is not a terminal (and in log.txt)
LINE_INTERVAL_ENV = "KDTOOLKIT_PROGRESS_EVERY"
LOG_FILE = "log.txt"


def line_interval() -> float:
    """Seconds between plain progress lines: ``$KDTOOLKIT_PROGRESS_EVERY``, default 30."""
    try:
        return max(0.0, float(os.environ.get(LINE_INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """Progress of one pass over the data.

    ``enabled``: ``"bar"`` (or True) redraws a one-line bar on a terminal; ``"lines"`` writes a plain
    line every ``line_interval()`` seconds (images/s, ETA, running loss terms), for output that goes
    to a file; ``""``/False is silent. In every mode a ``RunConsole`` stream also gets the plain
    lines in its ``log.txt``. ``postfix`` is a callable so that values needing a device sync are only
    computed when something is written. ``images_per_step`` turns steps/s into images/s;
    ``steps_after`` (steps of the epochs still to come) extends the ETA to the whole run.
    """

    def __init__(self, total: int, desc: str, *, enabled, stream: TextIO = sys.stderr, interval: float = 0.5,
                 images_per_step: int | None = None, steps_after: int = 0):
        self.total, self.desc, self.stream, self.interval = total, desc, stream, interval
        self.mode = "bar" if enabled is True else (enabled or "")
        self.enabled = bool(self.mode)
        self.images_per_step, self.steps_after = images_per_step, steps_after
        self.n = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._last_line = self.start
        self.every = line_interval()
        self._log = getattr(stream, "log_line", None)

    def update(self, n: int = 1, postfix=None) -> None:
        self.n += n
        if not self.enabled and self._log is None:
            return
        now = time.perf_counter()
        due_line = now - self._last_line >= self.every and self.n < self.total
        due_bar = self.mode == "bar" and (now - self._last >= self.interval or self.n >= self.total)
        if not (due_line or due_bar):
            return
        text = postfix() if postfix else ""
        if due_bar:
            self._last = now
            self._draw(text)
        if due_line:
            self._last_line = now
            self._line(text)

    def _rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.n / elapsed if elapsed > 0 else 0.0

    def _draw(self, postfix: str) -> None:
        rate = self._rate()
        frac = self.n / self.total if self.total else 1.0
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        eta_s = f"{eta:4.0f}s" if math.isfinite(eta) else "   ?"
        terminal = getattr(self.stream, "terminal", self.stream)
        terminal.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:6.1f} it/s eta {eta_s} {postfix}\x1b[K")
        terminal.flush()

    def line_text(self, postfix: str) -> str:
        """One plain progress line: where the pass is, speed, ETA (this pass, the run), loss terms."""
        rate = self._rate()
        pct = 100.0 * self.n / self.total if self.total else 100.0
        speed = f"{rate * self.images_per_step:.0f} img/s" if self.images_per_step else f"{rate:.1f} it/s"
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        run_eta = (self.total - self.n + self.steps_after) / rate if rate > 0 else math.inf
        eta_s = f"eta {_clock(eta)}" + (f" (run {_clock(run_eta)})" if self.steps_after else "")
        elapsed = _clock(time.perf_counter() - self.start)
        return f"{self.desc.strip()} step {self.n}/{self.total} ({pct:.0f}%) {speed} {eta_s} elapsed {elapsed} {postfix}".rstrip()

    def _line(self, postfix: str) -> None:
        text = self.line_text(postfix)
        if self.mode == "lines":
            self.stream.write(text + "\n")
            self.stream.flush()
        elif self._log is not None:
            self._log(text)

    def close(self, postfix=None) -> None:
        if self.mode == "bar":
            self._draw(postfix() if postfix else "")
            terminal = getattr(self.stream, "terminal", self.stream)
            terminal.write("\n")
            terminal.flush()


def progress_enabled(setting: str, stream: TextIO = sys.stderr) -> str:
    """The progress mode for ``run.progress``: ``"bar"`` (on, or auto on a terminal), ``"lines"`` (auto
    when the output is a file or a pipe) or ``""`` (off)."""
    if setting == "on":
        return "bar"
    if setting == "off":
        return ""
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


class RunConsole:
    """The console of a run, also kept in ``run_dir/log.txt`` (appended to on ``--resume``).

    Text written to it (``print(..., file=console)``) goes to ``terminal`` and to the log; progress
    bars redraw on ``terminal`` only, and their plain lines go to the log (``log_line``). While the
    run is alive, ``run_dir/running.json`` holds its process id (``kdtoolkit status`` reads it).
    """

    def __init__(self, terminal: TextIO, run_dir: Path):
        self.terminal = terminal
        self.run_dir = Path(run_dir)
        self.log = open(self.run_dir / LOG_FILE, "a", encoding="utf-8")
        self._marker = self.run_dir / RUNNING_FILE
        self._marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n")

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.log.write(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def log_line(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.terminal, "isatty", lambda: False)())

    def close(self) -> None:
        self._marker.unlink(missing_ok=True)
        self.log.close()

    def __enter__(self) -> "RunConsole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: present while a run is alive: {"pid", "host", "started"}
RUNNING_FILE = "running.json"


class MetricsWriter:
    """Appends one row per epoch to ``metrics.jsonl`` (or ``metrics.csv``) in the run directory."""

    def __init__(self, run_dir: Path, fmt: str):
        self.fmt = fmt
        self.path = Path(run_dir) / f"metrics.{fmt}"

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (a resumed run rewrites them)."""
        rows = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        self.path.unlink(missing_ok=True)
        for r in rows:
            self.write(r)

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "jsonl":
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            return
        rows = self.read() + [row]
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            if self.fmt == "jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
