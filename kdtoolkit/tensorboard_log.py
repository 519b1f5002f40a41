"""Optional TensorBoard event files: every numeric entry of every metrics row.

With ``[run] tensorboard = true`` the trainer hands each metrics row (one per epoch, the row that
goes to ``metrics.jsonl``) to :func:`log_metrics_row`, which writes every number in it as a scalar
under its own name (``train/loss/<term>``, ``lr``, ``test/<model>/top1``, ``train/images_per_s``,
whatever a method's ``epoch_metrics`` adds, ...) at step ``epoch``, into ``RUN_DIR/tensorboard/``.
Read them with ``tensorboard --logdir runs``. Needs the ``tensorboard`` package (``.[tensorboard]``;
the config checks it is importable when the option is on).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SUBDIR = "tensorboard"
_writers: dict[Path, Any] = {}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics row, without ``epoch`` and ``step``."""
    out = {}
    for key, value in row.items():
        if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def log_metrics_row(run_dir: str | Path, row: dict[str, Any], *, enabled: bool) -> None:
    """Write ``row``'s numbers to ``run_dir/tensorboard`` at step ``row["epoch"]`` (if ``enabled``)."""
    if not enabled:
        return
    from torch.utils.tensorboard import SummaryWriter

    path = Path(run_dir) / SUBDIR
    writer = _writers.get(path)
    if writer is None:
        writer = _writers[path] = SummaryWriter(log_dir=str(path))
    step = int(row.get("epoch", 0))
    for key, value in scalars(row).items():
        writer.add_scalar(key, value, global_step=step)
    writer.flush()


def resume_at(run_dir: str | Path, epoch: int, row: dict[str, Any] | None, *, enabled: bool) -> None:
    """A resumed run continues after ``epoch``: events of that epoch and later ones, written before
    the interruption (by a run that got further than its checkpoint), are purged (TensorBoard's
    ``purge_step``), and the checkpoint's own row of ``epoch`` is written again, so every epoch has
    one point, as ``metrics.jsonl`` has one row."""
    if not enabled:
        return
    from torch.utils.tensorboard import SummaryWriter

    path = Path(run_dir) / SUBDIR
    close(run_dir)
    _writers[path] = SummaryWriter(log_dir=str(path), purge_step=epoch)
    if row:
        log_metrics_row(run_dir, {**row, "epoch": epoch}, enabled=True)


def close(run_dir: str | Path) -> None:
    writer = _writers.pop(Path(run_dir) / SUBDIR, None)
    if writer is not None:
        writer.close()
