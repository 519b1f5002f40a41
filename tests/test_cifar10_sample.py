"""The CIFAR-10 sample shipped with the package (dataset ``cifar10_sample``) and the offline error of
the full ``cifar10`` dataset."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import torch

from kdtoolkit import Pipeline
from kdtoolkit.errors import ConfigError

from conftest import SHARED_DATA_DIRS


def sample(**options):
    from kdtoolkit_plugins.datasets import CifarOptions, build_cifar10_sample

    return build_cifar10_sample(CifarOptions(**options))


def test_sample_is_the_first_images_of_each_original_batch():
    """Bit for bit the exact subset's rows: 500 of each training batch, 1000 of the test batch."""
    subset = next((d / "cifar10-exact-subset" / "cifar-10-batches-py" for d in SHARED_DATA_DIRS
                   if (d / "cifar10-exact-subset").is_dir()), None)
    if subset is None:
        pytest.skip("the exact CIFAR-10 subset is not beside the repository")
    splits = sample()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(subset / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        expected.append((batch["data"][:500], batch["labels"][:500]))
    images = np.concatenate([d for d, _ in expected]).reshape(-1, 3, 32, 32)
    assert torch.equal(splits.train.images, torch.from_numpy(images))
    assert splits.train.labels.tolist() == sum((l for _, l in expected), [])
    with open(subset / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    assert torch.equal(splits.test.images, torch.from_numpy(test["data"][:1000].reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == test["labels"][:1000]


def test_sample_shape_classes_and_options():
    splits = sample()
    assert splits.train.images.shape == (2500, 3, 32, 32) and splits.test.images.shape == (1000, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.num_classes == 10
    assert splits.train.labels.bincount().min() > 200  # every class, roughly balanced
    small = sample(train_size=100, test_size=50)
    assert torch.equal(small.train.images, splits.train.images[:100]) and len(small.test) == 50
    assert len(sample(fraction=0.5).train) == 1250
    with pytest.raises(ConfigError, match="train_size=3000 but .*cifar10_sample.safetensors holds only 2500 images"):
        sample(train_size=3000)


def test_damaged_sample_is_refused(tmp_path, monkeypatch):
    from kdtoolkit_plugins.datasets import cifar10_sample

    damaged = tmp_path / "cifar10_sample.safetensors"
    damaged.write_bytes(cifar10_sample.FILE.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(cifar10_sample, "FILE", damaged)
    with pytest.raises(ConfigError, match="data.name: cifar10_sample: .* is damaged .*reinstall kdtoolkit"):
        sample()


def test_offline_download_names_the_fix_and_leaves_no_directory(tmp_path, monkeypatch):
    """Without the network, `download = true` fails with the way out, and the directories the download
    created (the default cache, typically) are removed again."""
    import torchvision.datasets.cifar as tv_cifar

    def offline(url, download_root, *args, **kwargs):
        import os

        os.makedirs(download_root, exist_ok=True)  # what torchvision does before fetching
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = tmp_path / "cache" / "kdtoolkit" / "data"
    pipe = Pipeline.from_dict({
        "run": {"output_dir": str(tmp_path / "run")},
        "data": {"name": "cifar10", "download": True, "root": str(root)},
        "models": {"student": {"name": "wrn", "depth": 10, "width": 1}},
        "losses": [{"name": "ce"}],
    })
    with pytest.raises(ConfigError) as info:
        pipe.build()
    message = str(info.value)
    assert "download to" in message and "KDTOOLKIT_DATA" in message and "data.root" in message
    assert "cifar10_sample" in message
    assert not (tmp_path / "cache").exists()
