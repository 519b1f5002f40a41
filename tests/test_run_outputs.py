"""What a run leaves for the usual tools: TensorBoard event files (read back), `kdtoolkit plot`
curves (the PNG opened), and the summary table at the end of `kdtoolkit run`."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kdtoolkit.cli import main

from conftest import tiny_pipeline

pytestmark = pytest.mark.slow


def test_tensorboard_events_plot_and_summary(cifar10_root, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    Image = pytest.importorskip("PIL.Image")
    toml = tmp_path / "p.toml"
    toml.write_text(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=2,
                                  extra="") .replace('progress = "off"', 'progress = "off"\ntensorboard = true\nmax_steps_per_epoch = 2'))
    r = CliRunner().invoke(main, ["run", str(toml)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2

    # summary: best and last accuracy per evaluated model, wall time, images/s, checkpoints
    best = max(rows, key=lambda row: row["test/student/top1"])
    line = next(li for li in r.output.splitlines() if li.startswith("student "))
    assert line.split()[1:5] == [f"{best['test/student/top1']:.2f}", str(best["epoch"]),
                                  f"{rows[-1]['test/student/top1']:.2f}", f"{rows[-1]['test/student/top5']:.2f}"]
    assert "wall time" in r.output and "images/s" in r.output
    assert f"checkpoints: {tmp_path / 'run' / 'checkpoints' / 'best.safetensors'}" in r.output

    # every numeric entry of every row is a scalar in the event file, at step = epoch
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for row in rows:
        for key, value in row.items():
            if key in ("epoch", "step"):
                continue
            assert key in tags, key
            events = {e.step: e.value for e in acc.Scalars(key)}
            assert events[row["epoch"]] == pytest.approx(value, rel=1e-6), key
    assert {"lr", "train/loss/ce", "train/loss/total", "test/student/top1", "train/images_per_s"} <= tags

    # curves of two runs side by side
    other = tmp_path / "run2"
    shutil.copytree(tmp_path / "run", other)
    out = tmp_path / "curves.png"
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "run"), str(other), "--out", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 1000
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "nothing"), "--out", str(out)])
    assert r.exit_code == 2 and "no metrics.jsonl" in r.output


def test_tensorboard_has_one_point_per_epoch_after_resuming_from_an_older_checkpoint(cifar10_root, tmp_path):
    """A resumed run that repeats epochs already logged (its ``last`` is older than the event file,
    as after a kill between the checkpoint and the metrics row, or a restored checkpoint) purges them:
    each epoch has one point per tag, with the value metrics.jsonl holds."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    toml = tmp_path / "p.toml"
    toml.write_text(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=2)
                    .replace('progress = "off"', 'progress = "off"\ntensorboard = true\nmax_steps_per_epoch = 2'))
    assert CliRunner().invoke(main, ["run", str(toml)]).exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    shutil.copy(last, tmp_path / "epoch2.safetensors")
    for _ in range(2):  # epoch 3 trained, then trained again from the epoch-2 checkpoint
        r = CliRunner().invoke(main, ["run", str(toml), "--resume", "--set", "run.epochs=3"])
        assert r.exit_code == 0, r.output
        shutil.copy(tmp_path / "epoch2.safetensors", last)
    rows = {r["epoch"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for key in ("train/loss/total", "test/student/top1", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3], (key, [e.step for e in events])
        assert [e.value for e in events] == pytest.approx([rows[e][key] for e in (1, 2, 3)], rel=1e-6)
