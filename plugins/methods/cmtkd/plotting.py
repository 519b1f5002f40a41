"""Figures from a run's metrics rows (``RUN_DIR/metrics.jsonl``).

``plot_fusion_weights`` draws CMT-KD's Figure 2 (Pham et al., WACV 2023): the importance weight
``softmax(π_k)_i`` of every teacher against training progress, one panel per fusion stage. The
``cmtkd`` method logs them each epoch as ``fusion/<stage>/<teacher>`` (``fusion/stage0/t4``, ...,
and ``fusion/logits/<teacher>`` for a learned combination of the heads).

matplotlib is optional (``pip install kdtoolkit[plot]``) and imported only when a figure is drawn;
figures are rendered with the Agg canvas directly, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from kdtoolkit.api import KDToolkitError

__all__ = ["FUSION_KEY", "fusion_series", "plot_fusion_weights"]

#: metrics key of one importance weight: ``fusion/<stage>/<teacher>``
FUSION_KEY = re.compile(r"^fusion/(?P<stage>[^/]+)/(?P<teacher>.+)$")


def _stage_order(stage: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"stage(\d+)", stage)
    return (0, int(m.group(1)), stage) if m else (1, 0, stage)


def fusion_series(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{stage: {teacher: (epochs, weights)}}`` from metrics rows (rows without the key are skipped).

    Stages come in order (``stage0``, ``stage1``, …, then others such as ``logits``); teachers in the
    order they first appear. The x value is the row's ``epoch`` (the end of that epoch).
    """
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        epoch = row.get("epoch")
        for key, value in row.items():
            m = FUSION_KEY.match(key)
            if not m or value is None or epoch is None:
                continue
            xs, ys = series.setdefault(m["stage"], {}).setdefault(m["teacher"], ([], []))
            xs.append(float(epoch))
            ys.append(float(value))
    return {stage: series[stage] for stage in sorted(series, key=_stage_order)}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KDToolkitError("plotting needs matplotlib: pip install kdtoolkit[plot]") from None
    return Figure, FigureCanvasAgg


def plot_fusion_weights(
    rows: list[dict], out_path: str | Path, *, title: str | None = None,
    stage_labels: Mapping[str, str] | None = None, dpi: int = 150,
) -> Path:
    """Plot the importance weight of every teacher against the epoch, one panel per fusion stage.

    ``rows`` are the per-epoch metrics rows of a ``cmtkd`` run (``metrics.jsonl``, one dict per
    line); ``out_path``'s suffix picks the format (``.png``, ``.pdf``, ``.svg``). Returns the path
    written. ``stage_labels`` renames panels (e.g. ``{"stage0": "layer 5"}`` as in the paper's
    figure). Raises ``KDToolkitError`` when the rows hold no ``fusion/...`` weights or matplotlib
    is not installed.
    """
    series = fusion_series(rows)
    if not series:
        raise KDToolkitError(
            "no importance weights (fusion/<stage>/<teacher>) in the metrics rows: was the run trained with "
            "method 'cmtkd', and has it finished an epoch?"
        )
    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(series)
    fig = Figure(figsize=(3.2 * n + 0.6, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    teachers = list(dict.fromkeys(t for per in series.values() for t in per))
    colors = {t: f"C{i % 10}" for i, t in enumerate(teachers)}
    for ax, (stage, per_teacher) in zip(axes, series.items()):
        for teacher, (xs, ys) in per_teacher.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color=colors[teacher], label=teacher)
        default = "head logits" if stage == "logits" else re.sub(r"^stage(\d+)$", r"stage \1", stage)
        ax.set_title((stage_labels or {}).get(stage, default))
        ax.set_xlabel("epoch")
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("importance weight softmax(π)")
    axes[-1].legend(title="teacher", fontsize="small", loc="best")
    fig.suptitle(title or "CMT-KD importance weights per teacher (cf. Pham et al., WACV 2023, Fig. 2)", fontsize="medium")
    fig.savefig(out, dpi=dpi)
    return out
