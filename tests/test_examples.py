"""Every example pipeline validates (`kdtoolkit validate`), and the quickstart pipelines run end to
end on the small CIFAR-10 subset."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_validates(path):
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def shrink(raw: dict, root: Path, run_dir: Path) -> dict:
    """The same pipeline at test scale: the CIFAR-10 subset, a couple of steps."""
    raw["data"].update(root=str(root), download=False, batch_size=32, eval_batch_size=128, train_size=256, test_size=128)
    raw["run"].update(epochs=1, max_steps_per_epoch=2, output_dir=str(run_dir), progress="off", precision="fp32")
    return raw


@pytest.mark.slow
def test_quickstart_pipelines_run(cifar10_root, tmp_path):
    ex = Path(__file__).resolve().parents[1] / "examples"
    teacher = shrink(tomllib.loads((ex / "quickstart_teacher.toml").read_text()), cifar10_root, tmp_path / "teacher")
    Pipeline.from_dict(teacher).fit()
    kd = shrink(tomllib.loads((ex / "quickstart_kd.toml").read_text()), cifar10_root, tmp_path / "kd")
    kd["models"]["teacher"]["checkpoint"] = str(tmp_path / "teacher")
    result = Pipeline.from_dict(kd).fit()
    assert {"train/loss/ce", "train/loss/kd", "test/student/top1", "test/teacher/top1"} <= set(result["last"])
