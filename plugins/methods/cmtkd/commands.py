"""``kdtoolkit plot-fusion``: CMT-KD's command, added to the CLI through ``register_commands``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click

from kdtoolkit.api import KDToolkitError

METRICS_FILES = ("metrics.jsonl", "metrics.csv")


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run (``metrics.jsonl``, else ``metrics.csv``); ``KDToolkitError``
    naming the directory when it has neither, or a row cannot be read."""
    for name in METRICS_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", newline="") as f:
            try:
                if name.endswith(".jsonl"):
                    rows = [json.loads(line) for line in f if line.strip()]
                else:
                    rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
            except (ValueError, csv.Error) as exc:
                raise KDToolkitError(f"{path}: not a metrics file ({exc})") from None
        if rows:
            return rows
    raise KDToolkitError(f"{run_dir}: no metrics.jsonl or metrics.csv")


def register(cli: click.Group) -> None:
    """Add CMT-KD's commands to ``cli``."""

    @cli.command("plot-fusion")
    @click.argument("run_dir", type=click.Path(file_okay=False))
    @click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Image to write (.png, .pdf or .svg).")
    def plot_fusion(run_dir, out):
        """Plot CMT-KD importance weights per teacher over training, one panel per fusion stage."""
        from kdtoolkit_plugins.methods.cmtkd.plotting import plot_fusion_weights

        click.echo(f"wrote {plot_fusion_weights(read_metrics(run_dir), out)}")
