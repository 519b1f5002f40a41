"""CMT-KD plotting (kdtoolkit_plugins.methods.cmtkd.plotting): CMT-KD's Figure 2 from metrics rows."""

from __future__ import annotations

import sys

import pytest

from kdtoolkit.errors import KDToolkitError
from kdtoolkit_plugins.methods.cmtkd.plotting import fusion_series, plot_fusion_weights

TEACHERS = ("t4", "t6", "t8")


def rows(epochs: int = 5, stages: int = 4) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train/loss/total": 1.0 / e, "test/student/top1": 10.0 * e}
        for k in range(stages):
            w = [1.0, 1.0 + 0.1 * e * k, 1.0 + 0.2 * e]
            s = sum(w)
            row.update({f"fusion/stage{k}/{t}": v / s for t, v in zip(TEACHERS, w)})
        out.append(row)
    return out


def test_series_are_grouped_by_stage_in_order():
    data = rows(3, 11)
    data[0]["fusion/logits/t4"] = 1.0
    series = fusion_series(data)
    assert list(series) == [f"stage{k}" for k in range(11)] + ["logits"]  # numeric order, not text order
    xs, ys = series["stage2"]["t6"]
    assert xs == [1.0, 2.0, 3.0] and len(ys) == 3
    assert list(series["stage0"]) == list(TEACHERS)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_a_figure(tmp_path, suffix):
    out = plot_fusion_weights(rows(), tmp_path / "sub" / f"fig{suffix}", stage_labels={"stage0": "layer 5"})
    assert out == tmp_path / "sub" / f"fig{suffix}" and out.is_file()
    head = out.read_bytes()[:8]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<" in head


def test_rows_without_fusion_weights_are_a_clear_error(tmp_path):
    with pytest.raises(KDToolkitError, match="cmtkd"):
        plot_fusion_weights([{"epoch": 1, "train/loss/total": 1.0}], tmp_path / "fig.png")


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(KDToolkitError, match=r"pip install kdtoolkit\[plot\]"):
        plot_fusion_weights(rows(), tmp_path / "fig.png")
    assert not (tmp_path / "fig.png").exists()
