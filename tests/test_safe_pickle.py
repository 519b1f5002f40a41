"""Dataset pickles are read without executing code (kdtoolkit.data.safe_pickle)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdtoolkit.cli import main
from kdtoolkit.data import safe_pickle
from kdtoolkit.errors import DataError

from conftest import tiny_pipeline


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(base: Path, name: str, marker: Path) -> None:
    with open(base / name, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Payload(marker)}, f)


def test_restricted_unpickler_refuses_a_payload_and_reads_arrays(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path, "batch", marker)
    with pytest.raises(DataError, match="posix.system|os.system"):
        safe_pickle.load(tmp_path / "batch")
    assert not marker.exists()
    with open(tmp_path / "ok", "wb") as f:
        pickle.dump({"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "s": "x", "b": b"y", "f": 1.5}, f)
    got = safe_pickle.load(tmp_path / "ok")
    assert got["labels"] == [1, 2] and got["data"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["b"] == b"y"


def test_reader_matches_torchvision_on_real_files(cifar10_root):
    from kdtoolkit_plugins.datasets.cifar import LocalCIFAR10, _read_split

    ours = _read_split(LocalCIFAR10, Path(cifar10_root), train=False)
    # torchvision's own reader (plain pickle) on the same trusted files, as the reference
    tv = LocalCIFAR10(str(cifar10_root), train=False, download=False)
    assert torch.equal(ours.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
    assert ours.labels.tolist() == list(tv.targets)


def _cifar_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "cifar-10-batches-py", dst / "cifar-10-batches-py")
    return dst


def test_kdtoolkit_run_refuses_a_planted_batch_file(tmp_path, cifar10_root):
    root = _cifar_copy(cifar10_root, tmp_path / "data")
    marker = tmp_path / "pwned"
    plant(root / "cifar-10-batches-py", "data_batch_1", marker)
    path = tmp_path / "p.toml"
    path.write_text(tiny_pipeline(root, tmp_path / "run"))
    r = CliRunner().invoke(main, ["run", str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "data_batch_1" in r.output and "refused" in r.output
    assert not marker.exists()


def test_eval_of_a_received_run_directory_with_a_relative_data_root_runs_no_code(tmp_path, cifar10_root, monkeypatch):
    """A run directory from someone else whose pipeline.json points at data inside itself."""
    from kdtoolkit import Pipeline

    received = tmp_path / "received"
    root = _cifar_copy(cifar10_root, received / "data")
    marker = tmp_path / "pwned"
    plant(root / "cifar-10-batches-py", "test_batch", marker)
    import tomllib

    pipe = Pipeline.from_dict(tomllib.loads(tiny_pipeline(Path("received/data"), Path("received"))))
    (received / "pipeline.json").write_text(json.dumps(pipe.raw))
    (received / "checkpoints").mkdir()
    (received / "checkpoints" / "best.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["eval", "received"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "test_batch" in r.output and "refused" in r.output
    assert not marker.exists()
