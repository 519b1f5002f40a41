"""``kdtoolkit status RUN_DIR``: where a run stands, from the files in its run directory alone.

Reads ``pipeline.json`` (epochs planned), the metrics file (last and best rows), the last checkpoint's
metadata (the epoch a ``--resume`` continues from), ``running.json`` (written while the run is alive,
removed when it ends; a process id that no longer exists means the run was killed) and ``log.txt``.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdtoolkit.engine.output import LOG_FILE, RUNNING_FILE
from kdtoolkit.errors import CheckpointError


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    jsonl, table = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    if jsonl.is_file():
        return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    if table.is_file():
        with open(table, encoding="utf-8", newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return []


def _number(text: str):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def _checkpoint_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("kdtoolkit", "null"))
    except Exception:  # noqa: BLE001 - a damaged file is reported, not raised
        return {"damaged": True}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """What ``kdtoolkit status`` prints, as a dict."""
    run_dir = Path(run_dir)
    if not (run_dir / "pipeline.json").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no pipeline.json)")
    config = json.loads((run_dir / "pipeline.json").read_text(encoding="utf-8"))
    epochs = int(config.get("run", {}).get("epochs", 1))
    rows = _metrics(run_dir)
    last = _checkpoint_meta(run_dir / "checkpoints" / "last.safetensors")
    done = int(last["epoch"]) if last and "epoch" in last else 0
    marker = run_dir / RUNNING_FILE
    process = None
    if marker.is_file():
        try:
            process = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            process = {}
    if process is not None and process.get("host") not in (None, socket.gethostname()):
        state = f"running on {process['host']} (pid {process.get('pid')}), as far as this machine can tell"
    elif process is not None and isinstance(process.get("pid"), int) and _alive(process["pid"]):
        state = f"running (pid {process['pid']})"
    elif process is not None:
        state = "not running: stopped before the end (killed or crashed)"
    elif done >= epochs:
        state = "finished"
    else:
        state = "not running: interrupted"
    if not state.startswith(("running", "finished")) and done < epochs:
        state += f"; continue with: kdtoolkit run PIPELINE --resume (from epoch {done})" if done else "; no checkpoint yet"
    log = run_dir / LOG_FILE
    last_line, age = None, None
    if log.is_file():
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        last_line = lines[-1] if lines else None
        age = time.time() - log.stat().st_mtime
    return {
        "run_dir": str(run_dir), "name": config.get("run", {}).get("name"), "state": state,
        "epochs_done": done, "epochs": epochs, "best": (last or {}).get("best"),
        "last_metrics": rows[-1] if rows else None, "log_last_line": last_line, "log_age_s": age,
    }


def format_status(status: dict[str, Any]) -> list[str]:
    lines = [f"{status['run_dir']}: run {status['name']!r}, {status['state']}",
             f"epochs: {status['epochs_done']} of {status['epochs']} checkpointed"]
    best = status["best"]
    if best:
        lines.append(f"best: {best['metric']} = {best['value']:.2f} (epoch {best['epoch']})")
    row = status["last_metrics"]
    if row:
        shown = {k: v for k, v in row.items() if k.startswith(("train/loss/", "test/")) and not k.endswith("/top5")}
        values = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        lines.append(f"last epoch ({row.get('epoch')}): {values}")
    if status["log_last_line"]:
        lines.append(f"log.txt, {status['log_age_s']:.0f} s ago: {status['log_last_line']}")
    return lines
