"""Single-model QAT from TOML, then `kdtoolkit export` and reloading the packed file."""

from __future__ import annotations

import tomllib

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.engine.assemble import build_model
from kdtoolkit.engine.checkpoint import Checkpoint
from kdtoolkit.export import load_model

from conftest import tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quantizer", ["hwgq", "lsq"])
def test_w2a2_run_export_and_reload(quantizer, cifar10_root, tmp_path):
    raw = tomllib.loads(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1))
    raw["models"]["student"]["quantizer"] = {"name": quantizer, "weight_bits": 2, "act_bits": 2}
    raw["run"].update(max_steps_per_epoch=3, precision="bf16", channels_last=True)
    pipe = Pipeline.from_dict(raw)
    result = pipe.fit()
    assert result["last"]["train/loss/ce"] > 0
    out = tmp_path / "student_w2a2.safetensors"
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "smaller" in r.output

    # the trained fake-quantized model, from the checkpoint
    ckpt = Checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    trained = build_model(pipe.config, pipe.registry, "student", 10)
    trained.load_state_dict(ckpt.model_state("student"))
    trained.eval()
    exported = load_model(out)
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        diff = (trained(images) - exported(images)).abs().max().item()
    assert diff <= 1e-5

    from kdtoolkit.quant.export import read_export_metadata

    meta = read_export_metadata(out)
    assert meta["architecture"]["model"] == "wrn" and meta["architecture"]["num_classes"] == 10
    packed = sum(t.numel() * t.element_size() for k, t in _tensors(out).items() if k.startswith("q:"))
    float32 = sum(4 * torch.Size(w["shape"]).numel() for w in meta["weights"].values())
    assert packed <= float32 / 10


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_export_of_float_run_is_a_clear_error(cifar10_root, tmp_path):
    raw = tomllib.loads(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1))
    raw["run"]["max_steps_per_epoch"] = 1
    Pipeline.from_dict(raw).fit()
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "not quantized" in r.output
