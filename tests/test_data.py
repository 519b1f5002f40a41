"""Dataset plugins, data roots, the epoch sampler, batched augmentation and the in-memory loader."""

from __future__ import annotations

import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import kdtoolkit_plugins.datasets as dataset_plugin
from kdtoolkit.data import DatasetSplits, TensorSplit
from kdtoolkit.data import augment
from kdtoolkit.data.loader import InMemoryLoader, StreamLoader, make_loader
from kdtoolkit.data.roots import resolve_data_root
from kdtoolkit.data.sampler import EpochSampler, epoch_seed
from kdtoolkit.errors import ConfigError
from kdtoolkit.plugins import collect, get_plugin_manager
from kdtoolkit_plugins.datasets import (
    CifarOptions,
    ImageFolderOptions,
    SVHNOptions,
    build_cifar10,
    build_cifar100,
    build_imagefolder,
    build_svhn,
)
from kdtoolkit_plugins.datasets.cifar import LocalCIFAR10

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_ROOT = SHARED / "cifar10-exact-subset"
CIFAR100_ROOT = SHARED / "cifar100-exact-subset"
needs_cifar100 = pytest.mark.skipif(not (CIFAR100_ROOT / "cifar-100-python").is_dir(), reason="no CIFAR-100 subset")

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_pickle(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture(scope="module")
def cifar10(cifar10_root):
    """CIFAR-10 from conftest's ``cifar10_root``: the exact subset, else synthetic pickles."""
    return build_cifar10(CifarOptions(), root=cifar10_root, download=False)


def real_cifar10(root: pathlib.Path) -> bool:
    return root.resolve() == CIFAR10_ROOT.resolve()


def random_split(n=64, size=8, channels=3, seed=0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return TensorSplit(images, torch.arange(n) % 10)


# ---- data root -----------------------------------------------------------------------------------


def test_root_configured_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_DATA", "/elsewhere")
    assert resolve_data_root(str(tmp_path)) == tmp_path


def test_root_relative_and_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root("data/x") == tmp_path / "data" / "x"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root("~/d") == tmp_path / "home" / "d"


def test_root_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("KDTOOLKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(None) == tmp_path / "xdg" / "kdtoolkit" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "kdtoolkit" / "data"


# ---- dataset plugins -------------------------------------------------------------------------------


def test_registered_datasets():
    registry = collect(get_plugin_manager(load_entrypoints=False, plugins=[dataset_plugin]))
    assert set(registry.names("dataset")) >= {"cifar10", "cifar100", "svhn", "imagefolder"}


def test_cifar10_matches_pickles(cifar10, cifar10_root):
    assert isinstance(cifar10, DatasetSplits)
    train, test = cifar10.train, cifar10.test
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and train.images.shape[1:] == (3, 32, 32)
    assert cifar10.num_classes == 10 and cifar10.image_size == (32, 32) and cifar10.name == "cifar10"
    base = cifar10_root / "cifar-10-batches-py"
    batches = [read_pickle(base / f"data_batch_{i}") for i in range(1, 6)]
    expected = np.concatenate([np.asarray(b["data"]) for b in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == [label for b in batches for label in b["labels"]]
    test_batch = read_pickle(base / "test_batch")
    assert test.labels.tolist() == list(test_batch["labels"])
    assert torch.equal(test.images[-1], torch.from_numpy(np.asarray(test_batch["data"][-1]).reshape(3, 32, 32)))
    if real_cifar10(cifar10_root):
        assert len(train) == 5085 and len(test) == 1017


def test_cifar10_statistics_match_constants(cifar10, cifar10_root):
    if not real_cifar10(cifar10_root):
        pytest.skip("needs the real CIFAR-10 subset")
    x = cifar10.train.images.float() / 255
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(cifar10.mean), atol=0.01)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(cifar10.std), atol=0.01)


@needs_cifar100
def test_cifar100_subsets():
    full = build_cifar100(root=CIFAR100_ROOT, download=False)
    assert len(full.train) == 486 and len(full.test) == 916 and full.num_classes == 100
    raw = read_pickle(CIFAR100_ROOT / "cifar-100-python" / "test")
    assert full.test.labels.tolist() == list(raw["fine_labels"])
    assert torch.equal(full.test.images[5], torch.from_numpy(np.asarray(raw["data"][5]).reshape(3, 32, 32)))
    x = full.test.images.float() / 255
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(full.mean), atol=0.02)

    small = build_cifar100(CifarOptions(train_size=100, test_size=50), root=CIFAR100_ROOT, download=False)
    assert len(small.train) == 100 and len(small.test) == 50
    assert torch.equal(small.train.images, full.train.images[:100])
    half = build_cifar100(CifarOptions(fraction=0.5), root=CIFAR100_ROOT, download=False)
    assert len(half.train) == 243 and len(half.test) == 916
    with pytest.raises(ConfigError, match="train_size=1000 but .* only 486"):
        build_cifar100(CifarOptions(train_size=1000), root=CIFAR100_ROOT, download=False)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"train_size": 0}, "train_size"), ({"test_size": -1}, "test_size"), ({"fraction": 0.0}, "fraction"),
     ({"fraction": 1.5}, "fraction"), ({"train_size": 10, "fraction": 0.5}, "fraction")],
)
def test_cifar_options_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CifarOptions(**kwargs)


def test_options_structure_from_toml_values():
    import cattrs

    conv = cattrs.Converter(forbid_extra_keys=True)
    assert conv.structure({"train_size": 100, "test_size": None}, CifarOptions) == CifarOptions(train_size=100)
    assert conv.structure({"fraction": 0.5, "include_extra": True}, SVHNOptions).include_extra
    image = conv.structure({"mean": [0.5, 0.5, 0.5], "resize": 72, "image_size": 64, "in_memory": True},
                           ImageFolderOptions)
    assert image.mean == (0.5, 0.5, 0.5) and image.resize == 72
    with pytest.raises(Exception):
        conv.structure({"train_szie": 1}, CifarOptions)


def test_cifar_missing_files_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_cifar10(root=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "data.root" in message and "KDTOOLKIT_DATA" in message and "download" in message
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(ConfigError, match="lacks test, meta"):
        build_cifar100(root=tmp_path, download=False)


def test_cifar_download_uses_torchvision_downloader(tmp_path, monkeypatch, cifar10_root):
    import torchvision.datasets.cifar as tv_cifar

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, pathlib.Path(download_root), filename, md5))
        shutil.copytree(cifar10_root / "cifar-10-batches-py", pathlib.Path(download_root) / "cifar-10-batches-py")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    splits = build_cifar10(CifarOptions(test_size=10), root=tmp_path, download=True)
    assert calls == [(tv_cifar.CIFAR10.url, tmp_path, tv_cifar.CIFAR10.filename, tv_cifar.CIFAR10.tgz_md5)]
    assert len(splits.train) == len(LocalCIFAR10(str(cifar10_root)).data) and len(splits.test) == 10


def _write_svhn_mat(path: pathlib.Path, n: int, seed: int):
    """A .mat file in SVHN's layout: X uint8 (32, 32, 3, N), y (N, 1) with labels 1..10 (10 = digit 0)."""
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    scipy_io.savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_reads_mat_files(tmp_path):
    """Images [N, C, H, W] from X's (H, W, C, N) layout, label 10 read as digit 0, extra appended."""
    files = {name: _write_svhn_mat(tmp_path / f"{name}_32x32.mat", n, seed)
             for (name, n, seed) in (("train", 40, 0), ("test", 12, 1), ("extra", 8, 2))}
    splits = build_svhn(root=tmp_path, download=False)
    x, y = files["train"]
    assert splits.train.images.shape == (40, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images, torch.from_numpy(x).permute(3, 2, 0, 1))  # torchvision's (N, C, H, W)
    labels = torch.from_numpy(y[:, 0].astype(np.int64))
    assert torch.equal(splits.train.labels, torch.where(labels == 10, 0, labels))
    assert splits.num_classes == 10 and len(splits.test) == 12
    assert int(splits.train.labels.min()) >= 0 and int(splits.train.labels.max()) <= 9
    with_extra = build_svhn(SVHNOptions(include_extra=True), root=tmp_path, download=False)
    assert len(with_extra.train) == 48
    assert torch.equal(with_extra.train.images[40:], torch.from_numpy(files["extra"][0]).permute(3, 2, 0, 1))


def test_svhn_errors(tmp_path):
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(ConfigError, match="scipy"):
            build_svhn(root=tmp_path, download=False)
    else:
        with pytest.raises(ConfigError, match="train_32x32.mat"):
            build_svhn(root=tmp_path, download=False)
    with pytest.raises(ValueError):
        SVHNOptions(fraction=2.0)


def write_imagefolder(root: pathlib.Path, size: int = 8, per_class: int = 3, classes=("cat", "dog")) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                path = root / split / c / f"{i}.png"
                Image.fromarray(a).save(path)
                arrays[(split, c, i)] = a
    return arrays


def test_imagefolder_streamed(tmp_path):
    write_imagefolder(tmp_path, size=12)
    splits = build_imagefolder(ImageFolderOptions(image_size=8), root=tmp_path, download=False)
    assert splits.num_classes == 2 and splits.image_size == (8, 8)
    image, label = splits.train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and label == 0
    assert len(splits.test) == 6
    loader = make_loader(splits.train, batch_size=4, augment=True, mean=splits.mean, std=splits.std, seed=0)
    assert isinstance(loader, StreamLoader) and len(loader) == 2
    loader.set_epoch(3)
    assert loader.sampler.epoch == 3
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64


def test_streamed_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    """A resumed run (a fresh loader set to epoch e) sees the batches of an uninterrupted one, with
    any number of workers, and loading does not disturb the main process's generators."""
    import random

    write_imagefolder(tmp_path, size=12)
    splits = build_imagefolder(ImageFolderOptions(image_size=8), root=tmp_path, download=False)

    def epoch_batches(epoch: int, workers: int, shuffle: bool = True):
        loader = make_loader(splits.train, batch_size=3, augment=True, mean=splits.mean, std=splits.std,
                             seed=7, num_workers=workers, shuffle=shuffle)
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))

    torch.manual_seed(123)
    random.seed(123)
    first = epoch_batches(2, workers=0)
    after = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()  # main generators untouched
    assert same(first, epoch_batches(2, workers=0))  # "resumed" at epoch 2
    assert same(first, epoch_batches(2, workers=2))  # worker processes draw the same transforms
    assert not same(first, epoch_batches(3, workers=0))
    # in a fixed order, another epoch gives the same labels but other crops and flips
    e2, e3 = epoch_batches(2, workers=0, shuffle=False), epoch_batches(3, workers=0, shuffle=False)
    assert all(torch.equal(y, v) for (_, y), (_, v) in zip(e2, e3))
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(e2, e3))


def test_imagefolder_in_memory_exact_pixels(tmp_path):
    arrays = write_imagefolder(tmp_path, size=8)
    options = ImageFolderOptions(image_size=8, in_memory=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    splits = build_imagefolder(options, root=tmp_path, download=False)
    assert isinstance(splits.train, TensorSplit) and splits.train.images.shape == (6, 3, 8, 8)
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.mean == (0.5, 0.5, 0.5)
    expected = torch.from_numpy(arrays[("val", "dog", 1)]).permute(2, 0, 1)
    assert torch.equal(splits.test.images[4], expected)


def test_imagefolder_in_memory_size_limit(tmp_path):
    write_imagefolder(tmp_path, size=8)
    options = ImageFolderOptions(image_size=224, in_memory=True, max_memory_gib=1e-4)
    with pytest.raises(ConfigError, match="in_memory = false"):
        build_imagefolder(options, root=tmp_path, download=False)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="no directory"):
        build_imagefolder(ImageFolderOptions(), root=tmp_path, download=False)
    write_imagefolder(tmp_path, size=8)
    (tmp_path / "val" / "emu").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "emu" / "0.png")
    with pytest.raises(ConfigError, match="different class folders.*emu"):
        build_imagefolder(ImageFolderOptions(image_size=8), root=tmp_path, download=False)
    with pytest.raises(ValueError, match="resize"):
        ImageFolderOptions(image_size=224, resize=200)
    with pytest.raises(ValueError, match="std"):
        ImageFolderOptions(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="train_crop"):
        ImageFolderOptions(train_crop="center")


def test_imagefolder_transforms_by_size():
    from torchvision import transforms

    from kdtoolkit_plugins.datasets.imagefolder import build_transforms, eval_resize

    small_train, _ = build_transforms(ImageFolderOptions(image_size=32))
    assert any(isinstance(t, transforms.RandomCrop) and t.padding == 4 for t in small_train.transforms)
    large_train, large_test = build_transforms(ImageFolderOptions(image_size=224))
    assert isinstance(large_train.transforms[0], transforms.RandomResizedCrop)
    assert eval_resize(ImageFolderOptions(image_size=224)) == 256
    assert large_test.transforms[0].size == 256


# ---- sampler -------------------------------------------------------------------------------------


def test_sampler_is_function_of_seed_and_epoch():
    a, b = EpochSampler(100, shuffle=True, seed=5), EpochSampler(100, shuffle=True, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(100)) and len(a) == 100
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 1_000_003 + 3)).tolist()
    assert list(a) == expected
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochSampler(100, shuffle=True, seed=6)) != list(EpochSampler(100, shuffle=True, seed=5))
    assert list(EpochSampler(7, shuffle=False, seed=1)) == list(range(7))


@pytest.mark.parametrize("n,drop_last", [(10, False), (11, False), (11, True), (3, False)])
def test_sampler_shards(n, drop_last):
    shards = [EpochSampler(n, shuffle=True, seed=2, rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    parts = [list(s) for s in shards]
    assert len(parts[0]) == len(parts[1]) == len(shards[0])
    if drop_last:
        assert len(parts[0]) == n // 2 and not set(parts[0]) & set(parts[1])
    else:
        assert set(parts[0]) | set(parts[1]) == set(range(n))
        assert len(parts[0]) == -(-n // 2)
    # same layout as torch's DistributedSampler given the same order
    order = EpochSampler(n, shuffle=True, seed=2)
    order.set_epoch(1)
    full = list(order)
    for r, part in enumerate(parts):
        dist = DistributedSampler(list(range(n)), num_replicas=2, rank=r, shuffle=False, drop_last=drop_last)
        assert part == [full[i] for i in dist]


def test_sampler_validation():
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, shuffle=True, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        EpochSampler(10, shuffle=True, seed=0, world_size=0)


# ---- augmentation ----------------------------------------------------------------------------------


def reference_crop(image: torch.Tensor, top: int, left: int, padding: int, mode: str) -> torch.Tensor:
    """One image: pad (torch.nn.functional.pad, per image) and slice."""
    h, w = image.shape[-2:]
    if mode == "zeros":
        padded = F.pad(image.float(), (padding,) * 4)
    else:
        padded = F.pad(image.float()[None], (padding,) * 4, mode=mode)[0]
    return padded[:, top : top + h, left : left + w].to(image.dtype)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_matches_per_image_reference(mode, dtype):
    images = random_split(n=40, size=8).images.to(dtype)
    offsets = augment.crop_offsets(40, 3, torch.Generator().manual_seed(7))
    assert offsets.min() >= 0 and offsets.max() <= 6 and len(set(map(tuple, offsets.tolist()))) > 10
    out = augment.random_crop(images, 3, torch.Generator().manual_seed(7), padding_mode=mode)
    assert out.shape == images.shape and out.dtype == dtype
    for i in range(40):
        top, left = offsets[i].tolist()
        assert torch.equal(out[i], reference_crop(images[i], top, left, 3, mode))


def test_crop_non_square_and_fused_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 6, 10), generator=g, dtype=torch.uint8)
    offsets = augment.crop_offsets(20, 2, g)
    flips = augment.flip_mask(20, g)
    assert 0 < int(flips.sum()) < 20
    fused = augment.crop(images, offsets, 2, flips=flips)
    for i in range(20):
        ref = reference_crop(images[i], *offsets[i].tolist(), 2, "zeros")
        assert torch.equal(fused[i], ref.flip(-1) if flips[i] else ref)
    # the fused gather draws and applies like random_flip(random_crop(x, g), g)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    chained = augment.random_flip(augment.random_crop(images, 2, g1), g1)
    fused = augment.crop(images, augment.crop_offsets(20, 2, g2), 2, flips=augment.flip_mask(20, g2))
    assert torch.equal(chained, fused)


def test_random_flip_matches_reference():
    images = random_split(n=30, size=5).images
    mask = augment.flip_mask(30, torch.Generator().manual_seed(4))
    out = augment.random_flip(images, torch.Generator().manual_seed(4))
    for i in range(30):
        assert torch.equal(out[i], images[i].flip(-1) if mask[i] else images[i])


def test_crop_padding_zero_and_errors():
    images = random_split(n=4, size=4).images
    assert torch.equal(augment.random_crop(images, 0, torch.Generator()), images)
    with pytest.raises(ValueError, match="reflect"):
        augment.random_crop(images, 4, torch.Generator(), padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        augment.random_crop(images, 1, torch.Generator(), padding_mode="wrap")


def test_normalize_matches_torchvision():
    from torchvision.transforms import functional as TF

    images = random_split(n=5, size=6).images
    expected = torch.stack([TF.normalize(TF.convert_image_dtype(im, torch.float32), MEAN, STD) for im in images])
    out = augment.normalize(images, MEAN, STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    floats = images.float() / 255
    torch.testing.assert_close(augment.normalize(floats, MEAN, STD), expected, rtol=0, atol=2e-6)
    assert torch.equal(floats, images.float() / 255)  # input untouched
    assert augment.normalize(images, MEAN, STD, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="channels"):
        augment.normalize(images, (0.5,), (0.5,))


# ---- in-memory loader ------------------------------------------------------------------------------


def denormalize(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() * s + m).mul(255).round().clamp(0, 255).to(torch.uint8)


def loader(split, **kwargs) -> InMemoryLoader:
    defaults = dict(batch_size=16, augment=True, mean=MEAN, std=STD, seed=3)
    defaults.update(kwargs)
    return InMemoryLoader(split, **defaults)


def collect_epoch(it):
    return [(x.clone(), y.clone()) for x, y in it]


def test_loader_shapes_and_length():
    split = random_split(n=50, size=8)
    batches = collect_epoch(loader(split))
    assert len(batches) == len(loader(split)) == 4
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64
    assert len(loader(split, drop_last=True)) == 3 and len(collect_epoch(loader(split, drop_last=True))) == 3
    bf16 = next(iter(loader(split, dtype=torch.bfloat16)))[0]
    assert bf16.dtype == torch.bfloat16
    assert all(torch.isfinite(x).all() for x, _ in batches)


def test_loader_eval_is_exact_and_in_order():
    split = random_split(n=20, size=8)
    batches = collect_epoch(loader(split, augment=False, batch_size=8))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, split.labels)
    torch.testing.assert_close(images, augment.normalize(split.images, MEAN, STD), rtol=0, atol=0)


def test_loader_augmented_images_are_crops_or_flips_of_their_source():
    split = random_split(n=24, size=8)
    sampler = EpochSampler(24, shuffle=True, seed=1)
    ld = loader(split, sampler=sampler, padding=2)
    ld.set_epoch(2)
    order = list(sampler)
    images = denormalize(torch.cat([x for x, _ in collect_epoch(ld)]))
    flipped = 0
    for i, src in enumerate(order):
        candidates = [
            (reference_crop(split.images[src], top, left, 2, "zeros"), flip)
            for top in range(5) for left in range(5) for flip in (False, True)
        ]
        matches = [flip for c, flip in candidates if torch.equal(c.flip(-1) if flip else c, images[i])]
        assert matches, f"image {i} is not a crop of source {src}"
        flipped += matches[0]
    assert 0 < flipped < 24


def test_loader_is_reproducible_per_epoch_and_resumable():
    split = random_split(n=40, size=8)
    uninterrupted = loader(split)
    epochs = []
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        epochs.append(collect_epoch(uninterrupted))
    resumed = loader(split)  # a fresh process resuming at epoch 2
    resumed.set_epoch(2)
    for (x1, y1), (x2, y2) in zip(epochs[2], collect_epoch(resumed)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    assert not torch.equal(torch.cat([y for _, y in epochs[0]]), torch.cat([y for _, y in epochs[1]]))
    # any single batch can be rebuilt alone
    x, y = resumed.batch(1, 2)
    assert torch.equal(x, epochs[1][2][0]) and torch.equal(y, epochs[1][2][1])
    assert resumed.epoch == 2
    with pytest.raises(IndexError):
        resumed.batch(1, 3)
    # a different seed gives different augmentation of the same order
    other = loader(split, seed=4, sampler=EpochSampler(40, shuffle=True, seed=3))
    other.set_epoch(0)
    assert not torch.equal(collect_epoch(other)[0][0], epochs[0][0][0])


def test_loader_augmentation_seeds_are_documented():
    # batch b of epoch e uses a generator seeded with epoch_seed(seed, e, b): crop, then flip
    split = random_split(n=10, size=8)
    ld = loader(split, augment=True, sampler=EpochSampler(10, shuffle=False, seed=0), batch_size=10)
    ld.set_epoch(5)
    x, _ = next(iter(ld))
    g = torch.Generator().manual_seed(epoch_seed(3, 5, 0))
    expected = augment.random_flip(augment.random_crop(split.images, 4, g), g)
    torch.testing.assert_close(x, augment.normalize(expected, MEAN, STD), rtol=0, atol=0)


def test_loader_channels_last():
    split = random_split(n=8, size=8)
    x, _ = next(iter(loader(split, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y, _ = next(iter(loader(split, channels_last=False)))
    assert torch.equal(x, y)


def test_loader_with_distributed_sampler_and_non_contiguous_split():
    images = random_split(n=12, size=8).images
    split = TensorSplit(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), torch.arange(12))
    seen = []
    for rank in range(2):
        dist = DistributedSampler(list(range(12)), num_replicas=2, rank=rank, shuffle=True, seed=0)
        ld = loader(split, sampler=dist, batch_size=4, augment=False)
        ld.set_epoch(1)
        assert dist.epoch == 1
        for x, y in ld:
            seen += y.tolist()
            torch.testing.assert_close(x, augment.normalize(images[y], MEAN, STD), rtol=0, atol=0)
    assert sorted(seen) == list(range(12))


def test_make_loader_on_cifar(cifar10, cifar10_root):
    train = make_loader(cifar10.train, batch_size=128, augment=True, mean=cifar10.mean, std=cifar10.std, seed=0)
    test = make_loader(cifar10.test, batch_size=500, augment=False, mean=cifar10.mean, std=cifar10.std)
    assert isinstance(train, InMemoryLoader)
    assert len(train) == -(-len(cifar10.train) // 128) and len(test) == -(-len(cifar10.test) // 500)
    assert train.sampler.shuffle and not test.sampler.shuffle
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32)
    if not real_cifar10(cifar10_root):
        return
    # normalised test images have roughly zero mean and unit std per channel
    xt = torch.cat([x for x, _ in test])
    assert xt.mean((0, 2, 3)).abs().max() < 0.1 and (xt.std((0, 2, 3)) - 1).abs().max() < 0.1
    # zero padding (-mean/std after normalising) covers ~13% of an average crop: the mean drops ~0.26
    assert -0.4 < float(x.mean()) < -0.1


def test_loader_argument_errors():
    split = random_split(n=4, size=4)
    with pytest.raises(ValueError, match="batch_size"):
        loader(split, batch_size=0)
    with pytest.raises(ValueError, match="mean/std"):
        loader(split, mean=(0.5,), std=(0.5,))
    with pytest.raises(TypeError, match="TensorSplit"):
        InMemoryLoader([1, 2], batch_size=2, augment=False, mean=MEAN, std=STD)


def test_cifar_download_true_uses_existing_local_files(cifar10_root, monkeypatch):
    """Local files that are not the original distribution (md5 differs) are used as they are even
    with download = true: no network access is attempted."""
    from torchvision.datasets import cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although the files are on disk")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    splits = build_cifar10(CifarOptions(test_size=10), root=cifar10_root, download=True)
    assert len(splits.test) == 10
