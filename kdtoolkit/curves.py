"""``kdtoolkit plot``: loss and accuracy curves of one or several runs, side by side.

Reads each run's ``metrics.jsonl`` (or ``metrics.csv``) and draws three panels sharing the epoch
axis: the training loss terms (``train/loss/*``, the total solid and the terms dashed), the test
top-1 of every evaluated model, and the learning rate. Each run has its own colour; a legend names
``run: series``. Needs matplotlib (``.[plot]``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kdtoolkit.errors import CheckpointError, KDToolkitError


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics rows of a run directory (``metrics.jsonl``, else ``metrics.csv``)."""
    run_dir = Path(run_dir)
    jsonl, csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    try:
        if jsonl.is_file():
            return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as f:
                return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{run_dir}: unreadable metrics file ({exc})") from None
    raise CheckpointError(f"{run_dir}: no metrics.jsonl or metrics.csv (not a run directory, or no epoch finished)")


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return None if value == "" else value


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "epoch" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw the curves of ``run_dirs`` into ``out`` (.png, .pdf or .svg); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KDToolkitError("kdtoolkit plot needs matplotlib: pip install 'kdtoolkit[plot]'") from None
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    names = [d.name or str(d) for d, _ in runs]
    if len(set(names)) != len(names):
        names = [str(d) for d, _ in runs]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((_, rows), name) in enumerate(zip(runs, names)):
        colour = colours[i % len(colours)]
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        for key in [k for k in keys if k.startswith("train/loss/")]:
            term = key.rsplit("/", 1)[-1]
            loss_ax.plot(*_series(rows, key), color=colour, linestyle="-" if term == "total" else "--",
                         marker=".", label=f"{name}: {term}")
        for key in [k for k in keys if k.startswith("test/") and k.endswith("/top1")]:
            acc_ax.plot(*_series(rows, key), color=colour, marker="o", label=f"{name}: {key.split('/')[1]}")
        lr_ax.plot(*_series(rows, "lr"), color=colour, marker=".", label=name)
    for ax, title, ylabel in ((loss_ax, "training loss", "loss"), (acc_ax, "test accuracy", "top-1 (%)"), (lr_ax, "learning rate", "lr")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
