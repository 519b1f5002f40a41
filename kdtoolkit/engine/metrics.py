"""The per-epoch metrics file of a run: ``metrics.jsonl`` (or ``metrics.csv``), rank 0 only.

Strict JSON (a non-finite value is written as ``null``). A JSON row is appended (a kill mid-append
leaves at most a partial last line, which ``read`` drops and ``repair`` removes); every rewrite (the
CSV file each epoch, ``repair`` on resume) goes to a temporary file renamed over the old one, so a
kill never loses the rows already written.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from kdtoolkit.engine.checkpoint import atomic_write, json_safe, sequence_point
from kdtoolkit.errors import CheckpointError


class MetricsWriter:
    """Appends one row per epoch to ``metrics.jsonl`` (or ``metrics.csv``) in the run directory."""

    def __init__(self, run_dir: Path, fmt: str):
        self.fmt = fmt
        self.path = Path(run_dir) / f"metrics.{fmt}"

    def write(self, row: dict[str, Any]) -> None:
        row = json_safe(row)
        if self.fmt == "jsonl":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            self._rewrite(self.read() + [row])
        sequence_point(f"{self.path.name}:row")

    def repair(self, epoch: int, row: dict[str, Any] | None) -> None:
        """Make the file hold exactly one row per epoch up to ``epoch``, the last one being ``row``
        when the file lacks it (the checkpoint's copy of the row a kill kept from being written).
        Rows of later epochs (a resumed run writes them again) and a partial last line go."""
        rows: list[dict[str, Any]] = []
        seen: set = set()
        for r in self.read():
            e = r.get("epoch")
            if isinstance(e, int) and e <= epoch and e not in seen:
                rows.append(r)
                seen.add(e)
        if row is not None and epoch not in seen:
            rows.append(row)
        if rows or self.path.exists():
            self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO(newline="")
        if self.fmt == "jsonl":
            buf.writelines(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows)
        else:
            keys: list[str] = []
            for r in rows:
                keys.extend(k for k in r if k not in keys)
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            w.writerows(json_safe(r) for r in rows)
        data = buf.getvalue().encode("utf-8")
        atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(data))

    def read(self) -> list[dict[str, Any]]:
        """The rows; a partial last line (a kill mid-append) is left out, any other damage is an error."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if self.fmt != "jsonl":
            return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]
        lines = text.split("\n")
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if i == len(lines) - 1:  # no newline after it: a row whose append was interrupted
                    break
                raise CheckpointError(f"{self.path}:{i + 1}: damaged metrics row ({exc})") from None
            rows.append(row)
        return rows


def _number(v: str):
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
