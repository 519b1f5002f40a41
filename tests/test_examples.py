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


@pytest.mark.slow
def test_quickstart_qat_warm_starts_trains_and_exports(cifar10_root, tmp_path):
    """quickstart.toml, then quickstart_qat.toml warm-started from it, then `kdtoolkit export`."""
    from kdtoolkit.export import load_model

    ex = Path(__file__).resolve().parents[1] / "examples"
    float_run = shrink(tomllib.loads((ex / "quickstart.toml").read_text()), cifar10_root, tmp_path / "float")
    Pipeline.from_dict(float_run).fit()
    qat = shrink(tomllib.loads((ex / "quickstart_qat.toml").read_text()), cifar10_root, tmp_path / "qat")
    assert qat["models"]["student"]["checkpoint"] == "runs/quickstart"
    qat["models"]["student"]["checkpoint"] = str(tmp_path / "float")
    result = Pipeline.from_dict(qat).fit()
    assert 0 <= result["last"]["test/student/top1"] <= 100
    import json

    from kdtoolkit.quant import native

    environment = json.loads((tmp_path / "qat" / "environment.json").read_text())
    assert environment["native_quantizer_kernels"] == native.status()["available"]
    assert json.loads((tmp_path / "float" / "environment.json").read_text())["native_quantizer_kernels"] is None
    out = tmp_path / "w2a2.safetensors"
    exported = CliRunner().invoke(main, ["export", str(tmp_path / "qat"), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    model = load_model(out)
    assert sum(1 for m in model.modules() if getattr(m, "weight_bits", 32) == 2) >= 10


BASELINES = [
    "baselines/cifar10_wrn16_1_at.toml",
    "baselines/cifar10_wrn16_1_fitnet.toml",
    "baselines/cifar10_wrn16_1_fitnet_two_stage.toml",
    "baselines/cifar10_wrn16_1_kd.toml",
    "baselines/cifar100_multiteacher_kd.toml",
    "baselines/cifar100_minlogit_mutual.toml",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_distillation_examples_run_on_the_subset(name, cifar10_root, cifar100_root, tmp_path):
    """AT, FitNet (one- and two-stage), KD, multi-teacher KD and MinLogit mutual learning, as
    written in examples/, at test scale. Each frozen teacher's checkpoint comes from a one-step
    supervised run of the same architecture."""
    import math

    ex = Path(__file__).resolve().parents[1] / "examples"
    raw = tomllib.loads((ex / name).read_text())
    root = cifar10_root if raw["data"]["name"] == "cifar10" else cifar100_root
    raw = shrink(raw, root, tmp_path / "run")
    raw["data"]["train_size"] = 128
    for model_name, spec in raw["models"].items():
        if spec.get("frozen"):
            arch = {k: v for k, v in spec.items() if k not in ("role", "frozen", "checkpoint", "checkpoint_model", "evaluate")}
            teacher = {"run": {}, "data": dict(raw["data"]), "models": {"student": arch}}
            teacher = shrink(teacher, root, tmp_path / f"teacher_{model_name}")
            Pipeline.from_dict(teacher).fit()
            spec["checkpoint"] = str(tmp_path / f"teacher_{model_name}")
    pipe = Pipeline.from_dict(raw)
    pipe.validate()
    last = pipe.fit()["last"]
    terms = [k for k in last if k.startswith("train/loss/")]
    assert len(terms) >= 3  # at least two named terms plus the total
    assert all(math.isfinite(last[k]) for k in terms)
    assert "test/student/top1" in last
