"""Shared fixtures: small real CIFAR data in torchvision's layout."""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest

#: the plugin-author test kit: the fake_distribution fixture (kdtoolkit.testing)
pytest_plugins = ["kdtoolkit.testing"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
#: where the shared offline data may be: beside the repository, or beside the worktrees' directory
SHARED_DATA_DIRS = (SHARED_DATA, REPO.parents[1] / "shared" / "data")


def _synthetic_cifar10(root: Path) -> Path:
    """CIFAR-10 in torchvision's on-disk layout with random pixels (when the real subset is absent)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, 200).tolist()
        data = rng.integers(0, 256, (200, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def native_kernels_or_skip() -> None:
    """Skip unless the fused quantizer kernels build here (KDTOOLKIT_NATIVE=require, as in CI, fails instead)."""
    from kdtoolkit.quant import native

    if native.library() is None:
        pytest.skip(f"native quantizer kernels unavailable: {native.status()['reason']}")


#: the eager implementations behind the first-party quantizer ops, see select_quant_path
QUANT_PATHS = ["native", "aten"]


def select_quant_path(path: str, plugin_module, monkeypatch) -> str:
    """Make the quantizer ops (kdtoolkit.quant.ops) take one implementation: "native" (the fused C
    kernels) or "aten" (the ATen implementation, native kernels off)."""
    from kdtoolkit.quant import native

    if path == "native":
        native_kernels_or_skip()
    elif path == "aten":
        monkeypatch.setattr(native, "supports", lambda *args: False)
    else:
        raise ValueError(path)
    return path


def _sample_as_cifar10(root: Path) -> Path:
    """The embedded CIFAR-10 sample (dataset cifar10_sample) written in torchvision's layout."""
    from kdtoolkit_plugins.datasets import build_cifar10_sample

    splits = build_cifar10_sample()
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train_rows = [f"data_batch_{i}" for i in range(1, 6)]
    n = len(splits.train) // len(train_rows)
    parts = [(name, splits.train, slice(i * n, (i + 1) * n)) for i, name in enumerate(train_rows)]
    for name, split, rows in parts + [("test_batch", splits.test, slice(None))]:
        data = split.images[rows].reshape(-1, 3072).numpy()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": split.labels[rows].tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return root


@pytest.fixture(scope="session")
def registry():
    """kdtoolkit's own plugins from an explicit module list, whatever else is installed."""
    from kdtoolkit.testing import first_party_registry

    return first_party_registry()


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """Real CIFAR-10 images in torchvision's layout: $KDTOOLKIT_TEST_CIFAR10, else the bit-exact subset
    from the shared data directory (5085 train / 1017 test), else the sample shipped with the package
    (2500 / 1000), else synthetic."""
    for candidate in (os.environ.get("KDTOOLKIT_TEST_CIFAR10"), *(d / "cifar10-exact-subset" for d in SHARED_DATA_DIRS)):
        if candidate and (Path(candidate) / "cifar-10-batches-py").is_dir():
            return Path(candidate)
    try:
        return _sample_as_cifar10(tmp_path_factory.mktemp("cifar10_sample"))
    except Exception:  # noqa: BLE001 - no sample installed: random pixels in the same layout
        return _synthetic_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root() -> Path:
    for path in (d / "cifar100-exact-subset" for d in SHARED_DATA_DIRS):
        if (path / "cifar-100-python").is_dir():
            return path
    pytest.skip("CIFAR-100 subset not available")


def tiny_pipeline(root: Path, run_dir: Path, *, epochs: int = 2, extra: str = "", model: str = "student", method: str = "supervised", losses: str | None = None) -> str:
    """A pipeline TOML small enough for a test: WRN-10-1 on 512 training images."""
    losses = '[[losses]]\nname = "ce"\n' if losses is None else losses
    return textwrap.dedent(f"""
        schema_version = 1
        [run]
        name = "tiny"
        seed = 3
        epochs = {epochs}
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 64
        eval_batch_size = 128
        train_size = 512
        test_size = 256
        [models.{model}]
        name = "wrn"
        depth = 10
        width = 1
        [method]
        name = "{method}"
        [optimizer]
        lr = 0.05
        schedule = {{ name = "cosine" }}
    """) + textwrap.dedent(losses) + textwrap.dedent(extra)


KILLER = '''
"""A schedule plugin that SIGKILLs its own process at fractional epoch KILL_AT_EPOCH: only the process
of rank KILL_RANK (default 0; a single process is rank 0), and in the first launch of a torchrun
worker group only (not after a restart)."""
import os, signal
import attrs
import kdtoolkit

@attrs.frozen
class Opts:
    pass

class KillAt:
    def __init__(self, options):
        self.at = float(os.environ.get("KILL_AT_EPOCH", "inf"))
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.armed = first and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0")
    def __call__(self, epoch, total_epochs):
        if self.armed and epoch >= self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return 1.0

@kdtoolkit.hookimpl
def register_schedules(register):
    register("kill_at", KillAt, options=Opts)
'''

RUNNER = '''
import sys, killer
from kdtoolkit import Pipeline
Pipeline.from_toml(sys.argv[1], plugins=[killer]).fit(resume=sys.argv[2] == "resume")
'''


def run_pipeline_process(tmp_path: Path, toml: Path, mode: str, kill_at: float | None = None):
    """Run ``toml`` in a fresh process (``mode`` "fresh" or "resume") with the ``kill_at`` schedule
    plugin available; with ``kill_at`` the process SIGKILLs itself at that fractional epoch."""
    import subprocess
    import sys

    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("KILL_AT_EPOCH", None)
    if kill_at is not None:
        env["KILL_AT_EPOCH"] = str(kill_at)
    return subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(toml), mode], env=env, capture_output=True, text=True)
