"""Checkpoints: safetensors + JSON, exact round trip of module, optimizer and RNG, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open

from kdtoolkit.engine import checkpoint as ck
from kdtoolkit.errors import CheckpointError


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = make()
    path = tmp_path / "c.safetensors"
    rng = torch.get_rng_state()
    ck.save_checkpoint(path, model, optimizer=opt, meta={"epoch": 3, "global_step": 9})
    c = ck.Checkpoint(path)
    assert c.meta["epoch"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(c.module_state[k], v)
    model2, opt2 = make()
    opt2.load_state_dict(c.optimizer_state())
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == 0.1
    torch.rand(10)
    c.restore_rng()
    assert torch.equal(torch.get_rng_state(), rng)


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    model, opt = make()
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, model, optimizer=opt, meta={"epoch": 1, "global_step": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kdtoolkit"])
        keys = list(f.keys())
    assert meta["format"] == "kdtoolkit-checkpoint"
    assert any(k.startswith("module/") for k in keys) and any(k.startswith("optim/") for k in keys)
    assert b"pickle" not in path.read_bytes()[:200]


def test_crash_mid_write_keeps_last_good(tmp_path, monkeypatch):
    model, opt = make()
    path = tmp_path / "last.safetensors"
    ck.save_checkpoint(path, model, optimizer=opt, meta={"epoch": 1, "global_step": 1})
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, model, optimizer=opt, meta={"epoch": 2, "global_step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind
    assert ck.Checkpoint(path).meta["epoch"] == 1


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable"):
        ck.Checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ck.Checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="without kdtoolkit metadata"):
        ck.Checkpoint(tmp_path / "foreign.safetensors")


def test_model_state_by_name(tmp_path):
    root = torch.nn.Module()
    root.models = torch.nn.ModuleDict({"student": torch.nn.Linear(2, 2), "teacher": torch.nn.Linear(2, 3)})
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, root, meta={"epoch": 1, "global_step": 1})
    c = ck.Checkpoint(path)
    assert set(c.model_state("teacher")) == {"weight", "bias"}
    with pytest.raises(CheckpointError, match="student, teacher"):
        c.model_state("nobody")
