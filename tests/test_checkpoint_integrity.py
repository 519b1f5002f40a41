"""Checkpoints verified on load, resume repairing what a kill interrupted, strict metrics, NaN handling.

One tiny finished run is trained once per module; each test works on a copy. Resuming a finished run
trains nothing, so these tests cost the loading and verification only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from kdtoolkit.cli import main
from kdtoolkit.engine.checkpoint import Checkpoint, digest
from kdtoolkit.engine.metrics import MetricsWriter

from conftest import tiny_pipeline


def small(root, run_dir, **kw) -> str:
    return tiny_pipeline(root, run_dir, **kw).replace("train_size = 512", "train_size = 256").replace("test_size = 256", "test_size = 128")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar10_root):
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "p.toml").write_text(small(cifar10_root, Path("run"), epochs=1))
    import os

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        r = CliRunner().invoke(main, ["run", "p.toml"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return tmp


@pytest.fixture
def run(finished, tmp_path, monkeypatch):
    """A copy of the finished run in ``tmp_path`` (the current directory); returns the run directory."""
    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copy(finished / "p.toml", tmp_path / "p.toml")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "run"


def resume(*extra):
    return CliRunner().invoke(main, ["run", "p.toml", "--resume", *extra])


def rewrite(path: Path, tensors=None, meta=None) -> None:
    """Rewrite a checkpoint with ``tensors(dict)`` / ``meta(dict)`` edits applied in place."""
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["kdtoolkit"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(data)
    if meta:
        meta(info)
    save_file(data, str(path), metadata={"kdtoolkit": json.dumps(info)})


def first_weight(data) -> str:
    return next(k for k in data if k.startswith("module/") and k.endswith("conv1.weight"))


def assert_refused(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def flip_exponent_bit(data):
    k = first_weight(data)
    raw = data[k].clone().view(torch.int32)
    raw.view(-1)[0] ^= 1 << 30
    data[k] = raw.view(torch.float32)


def fill_nan_with_digest(info_holder):
    def edit(data):
        k = first_weight(data)
        data[k] = torch.full_like(data[k], float("nan"))
        info_holder["k"] = k
        info_holder["d"] = digest(data[k])

    return edit


def test_flipped_bit_is_refused_on_resume_and_eval(run):
    rewrite(run / "checkpoints" / "last.safetensors", tensors=flip_exponent_bit)
    assert_refused(resume(), "last.safetensors", "does not match its digest")
    rewrite(run / "checkpoints" / "best.safetensors", tensors=flip_exponent_bit)
    assert_refused(CliRunner().invoke(main, ["eval", "run"]), "best.safetensors", "digest")


def test_nan_filled_tensor_is_refused_even_with_a_matching_digest(run):
    held = {}
    rewrite(
        run / "checkpoints" / "last.safetensors",
        tensors=fill_nan_with_digest(held),
        meta=lambda info: info["tensors"][held["k"]].update(sha256=held["d"]),
    )
    assert_refused(resume(), "last.safetensors", "non-finite")


def test_tensor_in_another_dtype_is_refused(run):
    def to_double(data):
        k = first_weight(data)
        data[k] = data[k].double()

    rewrite(run / "checkpoints" / "last.safetensors", tensors=to_double)
    assert_refused(resume(), "last.safetensors", "float64", "float32")


@pytest.mark.parametrize("prefix", ["optim/", "rng/", "module/"])
def test_missing_optimizer_rng_or_model_tensor_is_refused(run, prefix):
    def drop(data):
        del data[next(k for k in data if k.startswith(prefix))]

    rewrite(run / "checkpoints" / "last.safetensors", tensors=drop)
    assert_refused(resume(), "last.safetensors", "missing tensor", prefix)


def test_damaged_metadata_is_refused(run):
    path = run / "checkpoints" / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    save_file(data, str(path), metadata={"kdtoolkit": '{"format": "kdtoolkit-checkpoint", '})
    assert_refused(resume(), "last.safetensors", "damaged checkpoint metadata")


def test_checkpoint_without_digests_loads_with_a_warning(run):
    rewrite(run / "checkpoints" / "last.safetensors", meta=lambda info: info.pop("tensors"))
    r = resume()
    assert r.exit_code == 0, r.output
    assert "without tensor digests" in r.output


def test_identical_pipeline_resumes_without_a_difference_warning_a_real_change_warns(run):
    r = resume()
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "differs" not in r.output
    r = resume("--set", "optimizer.momentum=0.8")
    assert r.exit_code == 0, r.output
    assert "differs from the checkpoint's in: optimizer" in r.output


def test_failed_resume_keeps_pipeline_and_environment_records(run):
    before = {n: (run / n).read_bytes() for n in ("pipeline.json", "environment.json")}
    r = resume("--set", "models.student.width=2")
    assert_refused(r, "last.safetensors", "does not match this pipeline")
    assert {n: (run / n).read_bytes() for n in before} == before


def test_resume_repairs_best_and_the_metrics_row_a_kill_lost(run):
    """A kill after ``last`` was written: ``best`` not yet copied, the metrics row not yet appended."""
    rows = MetricsWriter(run, "jsonl").read()
    (run / "checkpoints" / "best.safetensors").unlink()
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / ".last.safetensors.abc.tmp").write_bytes(b"partial")
    r = resume()
    assert r.exit_code == 0, r.output
    assert Checkpoint(run / "checkpoints" / "best.safetensors").meta["epoch"] == 1
    assert MetricsWriter(run, "jsonl").read() == rows
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_partial_last_metrics_line_is_repaired_not_fatal(run):
    path = run / "metrics.jsonl"
    good = path.read_text()
    path.write_text(good + '{"epoch": 2, "train/lo')
    assert [r["epoch"] for r in MetricsWriter(run, "jsonl").read()] == [1]
    r = resume()
    assert r.exit_code == 0, r.output
    assert path.read_text() == good


def test_damaged_metrics_line_in_the_middle_names_the_file_and_line(run):
    path = run / "metrics.jsonl"
    path.write_text("{oops\n" + path.read_text())
    assert_refused(resume(), "metrics.jsonl:1")


def test_metrics_are_strict_json_and_csv_rewrites_are_atomic(tmp_path):
    w = MetricsWriter(tmp_path, "jsonl")
    w.write({"epoch": 1, "test/student/loss": float("nan"), "x": float("inf")})

    def refuse(name):
        raise ValueError(name)

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 1, "test/student/loss": None, "x": None}]
    c = MetricsWriter(tmp_path, "csv")
    c.write({"epoch": 1, "a": 1.5})
    c.write({"epoch": 2, "a": 2.5, "b": 3})
    assert c.read() == [{"epoch": 1, "a": 1.5, "b": None}, {"epoch": 2, "a": 2.5, "b": 3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]


# --- non-finite losses -----------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_stops_the_run_naming_term_and_step_last_and_best_stay_good(tmp_path, cifar10_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.toml").write_text(small(cifar10_root, Path("run"), epochs=1))
    assert CliRunner().invoke(main, ["run", "p.toml"]).exit_code == 0
    # continue for a second epoch with a learning rate that diverges
    r = CliRunner().invoke(main, ["run", "p.toml", "--resume", "--set", "run.epochs=2", "--set", "optimizer.lr=1e8"])
    assert r.exit_code == 2, r.output
    assert "NaN or infinite" in r.output and "epoch 2" in r.output and "Traceback" not in r.output
    for name in ("last", "best"):
        ckpt = Checkpoint(Path("run/checkpoints") / f"{name}.safetensors")  # verified: finite
        assert ckpt.meta["epoch"] == 1
    assert [row["epoch"] for row in MetricsWriter(Path("run"), "jsonl").read()] == [1]


class _NanEveryThirdStep:
    """A test plugin: a loss term that is NaN on every third call (a flaky mixed-precision step)."""

    def __init__(self):
        import attrs

        import kdtoolkit

        @attrs.frozen
        class Opts:
            pass

        class Flaky(torch.nn.Module):
            inputs = ("student",)
            calls = 0

            def __init__(self, options):
                super().__init__()

            def forward(self, student):
                type(self).calls += 1
                value = student.float().pow(2).mean() * 1e-3
                return value * float("nan") if type(self).calls % 3 == 0 else value

        @kdtoolkit.hookimpl
        def register_losses(register):
            register("flaky", Flaky, options=Opts)

        self.register_losses = register_losses


@pytest.mark.slow
def test_skip_step_skips_and_counts_nonfinite_steps(tmp_path, cifar10_root):
    from kdtoolkit import Pipeline

    losses = '[[losses]]\nname = "ce"\n[[losses]]\nname = "flaky"\n'
    path = tmp_path / "p.toml"
    toml = small(cifar10_root, tmp_path / "run", epochs=1, losses=losses)
    path.write_text(toml.replace('progress = "off"', 'progress = "off"\non_nonfinite = "skip_step"'))
    plugin = _NanEveryThirdStep()
    result = Pipeline.from_toml(path, plugins=[plugin]).fit()
    row = MetricsWriter(tmp_path / "run", "jsonl").read()[0]
    assert row["train/skipped_steps"] == 1  # 4 steps of 64 images: the third is NaN
    assert row["step"] == 4
    assert all(v is None or isinstance(v, (int, float)) for v in row.values())
    Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")  # verified finite
    assert result["best"]["epoch"] == 1
