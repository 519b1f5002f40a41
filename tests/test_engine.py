"""End to end on the small CIFAR-10 subset: train, checkpoint, evaluate, distil, crash and resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.engine.checkpoint import Checkpoint
from kdtoolkit.errors import CheckpointError

from conftest import tiny_pipeline, run_pipeline_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cifar10_root):
    """A supervised run through the CLI (used as the teacher of the KD tests)."""
    tmp = tmp_path_factory.mktemp("teacher")
    path = tmp / "teacher.toml"
    path.write_text(tiny_pipeline(cifar10_root, tmp / "run", epochs=2))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_and_safetensors_checkpoints(teacher_run):
    rows = read_metrics(teacher_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"train/loss/ce", "train/loss/total", "test/student/top1", "test/student/top5", "lr", "train/images_per_s"} <= set(r)
        assert 0 <= r["test/student/top1"] <= r["test/student/top5"] <= 100
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine schedule applied
    assert (teacher_run / "checkpoints" / "last.safetensors").is_file()
    assert (teacher_run / "checkpoints" / "best.safetensors").is_file()
    assert json.loads((teacher_run / "pipeline.json").read_text())["run"]["epochs"] == 2
    assert not list(teacher_run.rglob("*.pt")) and not list(teacher_run.rglob("*.pkl"))


def test_eval_reproduces_logged_accuracy(teacher_run):
    best = Checkpoint(teacher_run / "checkpoints" / "best.safetensors").meta["best"]
    logged = next(r for r in read_metrics(teacher_run) if r["epoch"] == best["epoch"])
    result = CliRunner().invoke(main, ["eval", str(teacher_run), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["test/student/top1"] == logged["test/student/top1"]
    assert metrics["test/student/top5"] == logged["test/student/top5"]


def test_eval_finds_the_data_the_run_read_from_the_environment(cifar10_root, tmp_path, monkeypatch):
    """A run that found its data through $KDTOOLKIT_DATA records the root; eval works without it."""
    path = tmp_path / "p.toml"
    text = tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1)
    text = text.replace(f'root = "{cifar10_root.as_posix()}"', "")
    assert "root =" not in text
    path.write_text(text)
    monkeypatch.setenv("KDTOOLKIT_DATA", str(cifar10_root))
    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["data_root"] == os.path.abspath(cifar10_root)
    assert environment["torch"] == torch.__version__
    logged = read_metrics(tmp_path / "run")[-1]
    monkeypatch.delenv("KDTOOLKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # the default root holds nothing
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["test/student/top1"] == logged["test/student/top1"]
    # an explicit $KDTOOLKIT_DATA still wins over the recorded root
    monkeypatch.setenv("KDTOOLKIT_DATA", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--json"])
    assert result.exit_code != 0 and "nowhere" in result.output


def test_kd_from_supervised_teacher(teacher_run, cifar10_root, tmp_path):
    extra = f"""
        [models.teacher]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        frozen = true
        checkpoint = "{teacher_run.as_posix()}"
    """
    losses = """
        [[losses]]
        name = "ce"
        weight = 0.5
        [[losses]]
        name = "kd"
        weight = 0.5
        temperature = 4.0
    """
    pipe = Pipeline.from_dict(__import__("tomllib").loads(tiny_pipeline(cifar10_root, tmp_path / "kd", epochs=1, method="kd", losses=losses, extra=extra)))
    built = pipe.build()
    teacher_before = {k: v.clone() for k, v in built.models["teacher"].state_dict().items()}
    expected = Checkpoint(teacher_run / "checkpoints" / "best.safetensors").model_state("student")
    for k, v in expected.items():
        assert torch.equal(teacher_before[k], v), k  # the teacher's weights came from the earlier run
    result = pipe.fit()
    rows = read_metrics(tmp_path / "kd")
    assert {"train/loss/ce", "train/loss/kd", "test/teacher/top1", "test/student/top1"} <= set(rows[0])
    # the frozen teacher never changed (weights and BN statistics)
    after = Checkpoint(tmp_path / "kd" / "checkpoints" / "last.safetensors").model_state("teacher")
    for k, v in teacher_before.items():
        assert torch.equal(after[k], v), k
    assert result["best"]["metric"] == "test/student/top1"


def test_existing_run_is_never_overwritten(teacher_run, cifar10_root):
    before = (teacher_run / "checkpoints" / "last.safetensors").read_bytes()
    pipe = Pipeline.from_dict(__import__("tomllib").loads(tiny_pipeline(cifar10_root, teacher_run)))
    with pytest.raises(CheckpointError, match="--resume"):
        pipe.fit()
    assert (teacher_run / "checkpoints" / "last.safetensors").read_bytes() == before


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar10_root):
    losses = """
        [[losses]]
        name = "ce"
        schedule = { name = "kill_at" }
    """
    ref_toml = tmp_path / "ref.toml"
    ref_toml.write_text(tiny_pipeline(cifar10_root, tmp_path / "ref", epochs=3, losses=losses))
    crash_toml = tmp_path / "crash.toml"
    crash_toml.write_text(tiny_pipeline(cifar10_root, tmp_path / "crash", epochs=3, losses=losses))

    ref = run_pipeline_process(tmp_path, ref_toml, "fresh")
    assert ref.returncode == 0, ref.stderr
    crashed = run_pipeline_process(tmp_path, crash_toml, "fresh", kill_at=1.5)  # half-way through the second epoch
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    last = Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors")
    assert last.meta["epoch"] == 1  # the crash lost only the unfinished epoch
    resumed = run_pipeline_process(tmp_path, crash_toml, "resume")
    assert resumed.returncode == 0, resumed.stderr

    a = Checkpoint(tmp_path / "ref" / "checkpoints" / "last.safetensors")
    b = Checkpoint(tmp_path / "crash" / "checkpoints" / "last.safetensors")
    assert b.meta["epoch"] == 3
    sa, sb = a.model_state("student"), b.model_state("student")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ra, rb = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        assert x["train/loss/total"] == y["train/loss/total"] and x["test/student/top1"] == y["test/student/top1"]


def test_resume_without_checkpoint_is_a_clear_error(cifar10_root, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(tiny_pipeline(cifar10_root, tmp_path / "none"))
    r = CliRunner().invoke(main, ["run", str(path), "--resume"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_param_groups_and_bf16_channels_last(cifar10_root, tmp_path):
    extra = """
        [[optimizer.param_groups]]
        params = ["models.student.fc.*"]
        lr_scale = 0.1
        weight_decay = 0.0
    """
    raw = __import__("tomllib").loads(tiny_pipeline(cifar10_root, tmp_path / "g", epochs=1, extra=extra))
    raw["run"].update(precision="bf16", channels_last=True, max_steps_per_epoch=2)
    pipe = Pipeline.from_dict(raw)
    result = pipe.fit()
    assert result["last"]["step"] == 2
    from kdtoolkit.engine.optim import build_optimizer

    built = pipe._built
    opt = build_optimizer(pipe.config, built.module)
    groups = {tuple(g["names"]): g for g in opt.param_groups}
    fc = next(g for names, g in groups.items() if "models.student.fc.weight" in names)
    assert fc["lr"] == pytest.approx(0.005) and fc["weight_decay"] == 0.0
    rest = next(g for names, g in groups.items() if "models.student.conv1.weight" in names)
    assert rest["lr"] == pytest.approx(0.05) and rest["weight_decay"] == pytest.approx(5e-4)
