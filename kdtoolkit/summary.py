"""The table ``kdtoolkit run`` prints at the end: per evaluated model its best and last accuracy,
then wall time, training throughput and where the checkpoints are. (``kdtoolkit eval RUN_DIR
--json`` is the machine-readable form.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _models(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("test/") and key.endswith("/top1") and key.split("/")[1] not in names:
                names.append(key.split("/")[1])
    return names


def run_summary(run_dir: str | Path, rows: list[dict[str, Any]], *, wall_seconds: float) -> str:
    """The summary table of a run whose metrics rows are ``rows`` (all epochs, resumed ones too)."""
    run_dir = Path(run_dir)
    lines = [f"{'model':<16} {'best top-1':>10} {'(epoch)':>7} {'last top-1':>10} {'last top-5':>10}"]
    for name in _models(rows):
        evaluated = [r for r in rows if isinstance(r.get(f"test/{name}/top1"), (int, float))]
        best = max(evaluated, key=lambda r: r[f"test/{name}/top1"])
        last = evaluated[-1]
        top5 = last.get(f"test/{name}/top5")
        lines.append(f"{name:<16} {best[f'test/{name}/top1']:>10.2f} {best.get('epoch', '?'):>7} "
                     f"{last[f'test/{name}/top1']:>10.2f} {top5 if top5 is None else format(top5, '.2f'):>10}")
    speeds = [r["train/images_per_s"] for r in rows if isinstance(r.get("train/images_per_s"), (int, float))]
    train_seconds = sum(r.get("train/seconds", 0.0) for r in rows if isinstance(r.get("train/seconds"), (int, float)))
    epochs = rows[-1].get("epoch", len(rows)) if rows else 0
    lines.append(f"epochs {epochs}, wall time {wall_seconds:.1f} s (training {train_seconds:.1f} s), "
                 f"{(sum(speeds) / len(speeds)) if speeds else 0.0:.0f} images/s (training, mean over epochs)")
    checkpoints = [p for p in (run_dir / "checkpoints" / "best.safetensors", run_dir / "checkpoints" / "last.safetensors") if p.is_file()]
    lines.append("checkpoints: " + (", ".join(str(p) for p in checkpoints) or "none"))
    return "\n".join(lines)
