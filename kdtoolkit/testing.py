"""A test kit for plugin authors (and for kdtoolkit's own tests).

* ``TestingPlugin``: a ``synthetic`` dataset (random uint8 images made in memory, no files) and a
  ``tiny_cnn`` model (two staged convolutions), so a pipeline trains in well under a second.
* ``tiny_pipeline(**tables)``: the plain-dict form of such a pipeline, to extend or override.
* ``first_party_registry()``: a registry of kdtoolkit's own plugins from an explicit module list,
  independent of whatever else is installed.
* ``FakeDistributions`` and the ``fake_distribution`` pytest fixture: install a distribution
  (``NAME-VERSION.dist-info`` with ``entry_points.txt``, and its modules) under ``tmp_path`` and put
  it on ``sys.path``, so entry-point discovery is tested exactly as after ``pip install``, without pip.

Use the fixture from a ``conftest.py``: ``pytest_plugins = ["kdtoolkit.testing"]``. Example::

    def test_my_loss_from_toml(fake_distribution):
        fake_distribution.install("kdtoolkit-my-loss", entry_points={"my_loss": "my_loss"},
                                  files={"my_loss.py": MY_LOSS_SOURCE})
        raw = tiny_pipeline(losses=[{"name": "my_loss"}])
        Pipeline(raw, plugins=[TestingPlugin()]).fit()
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable

import attrs
import pytest
import torch
from torch import nn

import kdtoolkit
from kdtoolkit.config.validators import positive
from kdtoolkit.data.types import DatasetSplits, TensorSplit

#: kdtoolkit's own plugins: entry-point name -> module (as in pyproject.toml)
FIRST_PARTY_PLUGINS: dict[str, str] = {
    "models": "kdtoolkit_plugins.models",
    "datasets": "kdtoolkit_plugins.datasets",
    "methods": "kdtoolkit_plugins.methods",
    "schedules": "kdtoolkit_plugins.schedules",
    "losses": "kdtoolkit_plugins.losses",
    "fusions": "kdtoolkit_plugins.losses.fusion",
    "hwgq": "kdtoolkit_plugins.quantizers.hwgq",
    "lsq": "kdtoolkit_plugins.quantizers.lsq",
    "ctkd": "kdtoolkit_plugins.methods.ctkd",
    "cmtkd": "kdtoolkit_plugins.methods.cmtkd",
}


class _Named:
    """A plugin object registered under its entry-point name (as an installed plugin would be)."""

    def __init__(self, name: str, module: Any):
        self.__name__ = name
        for attr in dir(module):
            if attr.startswith("register_"):
                setattr(self, attr, getattr(module, attr))


def first_party_plugins() -> list[Any]:
    """kdtoolkit's own plugins, imported from ``FIRST_PARTY_PLUGINS``, each under its entry-point name."""
    return [_Named(name, importlib.import_module(module)) for name, module in FIRST_PARTY_PLUGINS.items()]


def first_party_registry(*extra: Any):
    """A registry of the first-party plugins (and ``extra`` plugin objects), no entry points read."""
    from kdtoolkit.plugins import load_registry

    return load_registry(load_entrypoints=False, plugins=[*first_party_plugins(), *extra])


# --- a tiny in-memory pipeline -----------------------------------------------------------------


@attrs.frozen
class SyntheticOptions:
    """``synthetic``: random images whose class is visible in their mean brightness (learnable)."""

    num_classes: int = attrs.field(default=4, validator=positive)
    train_size: int = attrs.field(default=64, validator=positive)
    test_size: int = attrs.field(default=32, validator=positive)
    image_size: int = attrs.field(default=8, validator=positive)
    seed: int = 0


def _split(n: int, options: SyntheticOptions, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, options.num_classes, (n,), generator=g)
    s = options.image_size
    noise = torch.randint(0, 96, (n, 3, s, s), generator=g)
    level = (labels * (160 // max(options.num_classes - 1, 1))).view(n, 1, 1, 1)
    return TensorSplit(images=(noise + level).clamp(0, 255).to(torch.uint8), labels=labels)


def build_synthetic(options: SyntheticOptions | None = None, *, root: Path, download: bool) -> DatasetSplits:
    options = options or SyntheticOptions()
    return DatasetSplits(
        train=_split(options.train_size, options, options.seed),
        test=_split(options.test_size, options, options.seed + 1),
        num_classes=options.num_classes,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        image_size=(options.image_size, options.image_size),
        name="synthetic",
    )


@attrs.frozen
class TinyCNNOptions:
    """``tiny_cnn``: conv(3->width) -> conv(width->2*width) -> pool -> linear; two stages."""

    width: int = attrs.field(default=8, validator=positive)


class TinyCNN(nn.Module):
    stage_paths = ("stage1", "stage2")

    def __init__(self, options: TinyCNNOptions | None = None, *, num_classes: int):
        super().__init__()
        w = (options or TinyCNNOptions()).width
        self.stage1 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.fc = nn.Linear(2 * w, num_classes)

    def forward_stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return self.stage1(x)
        if k == 1:
            return self.stage2(x)
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(3):
            x = self.forward_stage(k, x)
        return x


class TestingPlugin:
    """The ``synthetic`` dataset and the ``tiny_cnn`` model: ``Pipeline(raw, plugins=[TestingPlugin()])``."""

    __name__ = "kdtoolkit.testing"

    @kdtoolkit.hookimpl
    def register_datasets(self, register):
        register("synthetic", build_synthetic, options=SyntheticOptions,
                 description="random uint8 images made in memory, for tests (kdtoolkit.testing)")

    @kdtoolkit.hookimpl
    def register_models(self, register):
        register("tiny_cnn", TinyCNN, options=TinyCNNOptions,
                 description="two-stage CNN for tests (kdtoolkit.testing); staged")


def tiny_pipeline(output_dir: str | Path = "runs/tiny", **tables: Any) -> dict:
    """The dict form of a pipeline that trains ``tiny_cnn`` on ``synthetic`` data for one epoch.

    Keyword arguments replace whole top-level tables (``models=...``, ``losses=[...]``, ``method=...``);
    ``run`` is merged into the defaults.
    """
    raw: dict[str, Any] = {
        "schema_version": 1,
        "run": {"name": "tiny", "epochs": 1, "seed": 0, "progress": "off", "output_dir": str(output_dir), "device": "cpu"},
        "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 32, "augment": False},
        "models": {"student": {"name": "tiny_cnn"}},
        "losses": [{"name": "ce"}],
        "optimizer": {"name": "sgd", "lr": 0.05},
    }
    raw["run"].update(tables.pop("run", {}))
    raw.update(tables)
    return raw


# --- fake installed distributions ---------------------------------------------------------------


class FakeDistributions:
    """Installs distributions under ``root`` and puts it first on ``sys.path`` (undone at teardown)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._monkeypatch = monkeypatch
        self._modules: set[str] = set()
        monkeypatch.syspath_prepend(str(self.root))

    def install(self, name: str, *, version: str = "0.1.0", entry_points: dict[str, str],
                files: dict[str, str] | None = None, copy_from: Iterable[Path] = ()) -> Path:
        """Write distribution ``name`` with ``entry_points`` (plugin name -> module) in the ``kdtoolkit``
        group, the ``files`` given as text (relative path -> source) and the packages in ``copy_from``
        (directories copied as they are). Returns the site directory it lives in."""
        import shutil

        site = self.root
        dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir(parents=True, exist_ok=False)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = ["[kdtoolkit]", *(f"{ep} = {module}" for ep, module in entry_points.items())]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for rel, text in (files or {}).items():
            path = site / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        for package in copy_from:
            shutil.copytree(package, site / Path(package).name, ignore=shutil.ignore_patterns("__pycache__"))
        self._modules.update(module.split(":")[0].split(".")[0] for module in entry_points.values())
        importlib.invalidate_caches()
        return site

    def cleanup(self) -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in self._modules:
                del sys.modules[name]


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A ``FakeDistributions`` under ``tmp_path``: ``fake_distribution.install(name, entry_points=..., files=...)``."""
    dists = FakeDistributions(tmp_path / "site-packages", monkeypatch)
    yield dists
    dists.cleanup()

