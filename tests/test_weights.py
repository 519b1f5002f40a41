"""Pretrained weights from anywhere, through a pipeline's `checkpoint = ...` (Pipeline.build, as
`kdtoolkit run` does): each format pinned, wrapper prefixes, and mismatches listed."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdtoolkit import Pipeline
from kdtoolkit.errors import CheckpointError

from conftest import tiny_pipeline


def source_model() -> torch.nn.Module:
    from kdtoolkit_plugins.models.wrn import WideResNet

    torch.manual_seed(11)
    model = WideResNet(10, 1, num_classes=10)
    with torch.no_grad():  # non-default BN buffers too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model


def build_with(root: Path, tmp_path: Path, checkpoint: str, *, quantizer: dict | None = None, model: dict | None = None):
    raw = tomllib.loads(tiny_pipeline(root, tmp_path / "run", epochs=1))
    raw["models"]["student"]["checkpoint"] = checkpoint
    if quantizer:
        raw["models"]["student"]["quantizer"] = quantizer
    if model:
        raw["models"]["student"] = {**model, "checkpoint": checkpoint}
    return Pipeline.from_dict(raw).build().models["student"]


def assert_same(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_plain_safetensors_state_dict_with_module_prefix(cifar10_root, tmp_path):
    ref = source_model().state_dict()
    path = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in ref.items()}, str(path))  # saved from DDP
    assert_same(build_with(cifar10_root, tmp_path, str(path)), ref)


@pytest.mark.parametrize("suffix,wrap", [(".pt", lambda s: s), (".pth", lambda s: {"state_dict": s, "epoch": 3})])
def test_torch_state_dict_with_compile_prefix(suffix, wrap, cifar10_root, tmp_path):
    ref = source_model().state_dict()
    path = tmp_path / f"weights{suffix}"
    torch.save(wrap({f"_orig_mod.{k}": v for k, v in ref.items()}), path)  # saved from torch.compile
    assert_same(build_with(cifar10_root, tmp_path, str(path)), ref)


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_torch_file_is_read_with_weights_only(cifar10_root, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"evil.pt: cannot be read as a state dict with torch.load\(weights_only=True\)"):
        build_with(cifar10_root, tmp_path, str(path))
    assert "pickle code ran" not in capsys.readouterr().out


def test_kdtoolkit_checkpoint_and_run_directory(cifar10_root, tmp_path):
    from kdtoolkit.engine.checkpoint import save_checkpoint

    ref = source_model()
    root = torch.nn.Module()
    root.models = torch.nn.ModuleDict({"teacher": ref})
    run = tmp_path / "teacher_run"
    save_checkpoint(run / "checkpoints" / "best.safetensors", root, meta={"student": "teacher"}, include_rng=False)
    assert_same(build_with(cifar10_root, tmp_path, str(run)), ref.state_dict())
    assert_same(build_with(cifar10_root, tmp_path, str(run / "checkpoints" / "best.safetensors")), ref.state_dict())


def test_float_weights_into_a_quantized_model(cifar10_root, tmp_path):
    ref = source_model().state_dict()
    path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    model = build_with(cifar10_root, tmp_path, str(path), quantizer={"name": "lsq", "weight_bits": 2, "act_bits": 2})
    assert_same(model, ref)
    from kdtoolkit_plugins.quantizers.lsq import LSQWeightQuantizer

    layer = model.block1[0].conv1  # LSQ weight step re-initialised from the loaded weight
    fresh = LSQWeightQuantizer(2, ref["block1.0.conv1.weight"])
    assert torch.equal(layer.weight_quantizer.step, fresh.step)


def test_mismatch_lists_missing_unexpected_and_shapes(cifar10_root, tmp_path):
    ref = source_model().state_dict()
    ref["extra.weight"] = torch.zeros(2)
    del ref["bn.running_var"]
    ref["fc.weight"] = torch.zeros(5, 64)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        build_with(cifar10_root, tmp_path, str(path))
    message = str(info.value)
    assert message.startswith("models.student.checkpoint: weights of")
    assert "missing keys: bn.running_var" in message
    assert "unexpected keys: extra.weight" in message
    assert "fc.weight (5, 64) vs (10, 64)" in message


def test_unknown_format_and_missing_file(cifar10_root, tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        build_with(cifar10_root, tmp_path, str(tmp_path / "w.npz"))
    with pytest.raises(CheckpointError, match="no such checkpoint file or run directory"):
        build_with(cifar10_root, tmp_path, str(tmp_path / "nope.pt"))


@pytest.mark.slow
def test_torchvision_weight_enum_from_the_hub_cache(cifar10_root, tmp_path, monkeypatch):
    """`checkpoint = "torchvision:IMAGENET1K_V1"`: torchvision's file, here placed in torch hub's cache
    layout instead of downloaded; the 1000-class head keeps its fresh 10-class initialisation."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cache.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache)
    model = build_with(cifar10_root, tmp_path, "torchvision:IMAGENET1K_V1",
                       model={"name": "torchvision", "arch": "resnet18"})
    ref = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
    assert_same(model, ref)
    assert model.fc.weight.shape == (10, 512)
    with pytest.raises(CheckpointError, match="unknown weights 'IMAGENET9K' for resnet18; available: DEFAULT, IMAGENET1K_V1"):
        build_with(cifar10_root, tmp_path, "torchvision:IMAGENET9K", model={"name": "torchvision", "arch": "resnet18"})
