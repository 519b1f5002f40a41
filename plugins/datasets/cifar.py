"""CIFAR-10 and CIFAR-100 in memory, from torchvision's on-disk layout.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. Files are read with
torchvision's ``CIFAR10``/``CIFAR100`` (``root/cifar-10-batches-py``, ``root/cifar-100-python``).
Existing files are used as they are, without torchvision's md5 check (copies that are not the
original distribution, e.g. subsets or re-encodings, load too); ``download=True`` goes through
torchvision's downloader, which checks the archive and the files.
"""

from __future__ import annotations

import os
import pathlib
import pickle

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from kdtoolkit.api import ConfigError, DatasetSplits, TensorSplit

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "LocalCIFAR10", "LocalCIFAR100",
    "load_cifar", "subset",
]

#: per-channel mean and standard deviation of the training images on the 0-1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class _LocalFiles:
    """Mixin for torchvision datasets: the files need only exist (no md5), except while ``download()``
    decides whether to fetch them (torchvision's own check, then its downloader verifies the archive)."""

    _verify_md5 = False

    def download(self) -> None:
        self._verify_md5 = True
        try:
            super().download()
        finally:
            self._verify_md5 = False

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        base = pathlib.Path(self.root, self.base_folder)
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class LocalCIFAR10(_LocalFiles, CIFAR10):
    """torchvision's CIFAR10 reading local files without an md5 match (see ``_LocalFiles``)."""


class LocalCIFAR100(_LocalFiles, CIFAR100):
    """torchvision's CIFAR100 reading local files without an md5 match (see ``_LocalFiles``)."""


_SPECS = {
    "cifar10": (LocalCIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (LocalCIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _missing_files(cls, root: pathlib.Path) -> list[str]:
    base = root / cls.base_folder
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [name for name in names if not (base / name).is_file()]


def _missing_parents(root: pathlib.Path) -> list[pathlib.Path]:
    """``root`` and its ancestors that do not exist yet, deepest first (a download creates them)."""
    missing = []
    for path in (root, *root.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(paths: list[pathlib.Path]) -> None:
    """Remove the directories a failed download created, deepest first, while they are empty."""
    for path in paths:
        for leftover in sorted(path.rglob("*"), reverse=True) if path.is_dir() else []:
            if leftover.is_dir() and not any(leftover.iterdir()):
                leftover.rmdir()
        try:
            path.rmdir()
        except OSError:
            return  # not empty (or gone): keep it and its parents


def _to_split(dataset) -> TensorSplit:
    # torchvision holds NHWC uint8; one permute to NCHW, made contiguous for fast row gathers.
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return TensorSplit(images, labels)


def subset(split: TensorSplit, size: int | None, *, what: str, where: pathlib.Path) -> TensorSplit:
    """The first ``size`` rows of ``split`` (all when ``size`` is None); error if there are fewer."""
    if size is None:
        return split
    if size > len(split):
        raise ConfigError(f"{what}={size} but {where} holds only {len(split)} images")
    return TensorSplit(split.images[:size].clone(), split.labels[:size].clone())


def fraction_size(n: int, fraction: float) -> int:
    """Rows kept by ``fraction`` of ``n`` (at least one)."""
    return max(1, round(n * fraction))


def load_cifar(name: str, options, *, root: pathlib.Path, download: bool) -> DatasetSplits:
    """``cifar10``/``cifar100`` as in-memory ``TensorSplit``s (see ``CifarOptions``)."""
    cls, num_classes, mean, std = _SPECS[name]
    root = pathlib.Path(root)
    # Files already on disk are used as they are, also with download = true (a copy that is not the
    # original distribution would otherwise fail torchvision's md5 check and be fetched again).
    download = download and bool(_missing_files(cls, root))
    if not download:
        missing = _missing_files(cls, root)
        if missing:
            what = (
                f"no {cls.base_folder}/ in {root}" if not (root / cls.base_folder).is_dir()
                else f"{root / cls.base_folder} lacks {', '.join(missing)}"
            )
            raise ConfigError(
                f"{name}: {what}; set data.root or $KDTOOLKIT_DATA to the directory that holds "
                f"{cls.base_folder}/, or set data.download = true"
            )
    created = _missing_parents(root) if download else []
    try:
        train = _to_split(cls(str(root), train=True, download=download))
        test = _to_split(cls(str(root), train=False, download=False))
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise ConfigError(f"{name}: could not load {root / cls.base_folder}: {exc}") from exc
    except OSError as exc:  # a failed download (URLError is an OSError)
        _remove_empty(created)
        raise ConfigError(
            f"{name}: download to {root} failed ({exc}); offline, put {cls.base_folder}/ under a directory "
            f"and set $KDTOOLKIT_DATA or data.root to it (or use the shipped sample: data.name = \"cifar10_sample\")"
        ) from exc
    train_size = options.train_size
    if options.fraction != 1.0:
        train_size = fraction_size(len(train), options.fraction)
    train = subset(train, train_size, what="train_size", where=root / cls.base_folder)
    test = subset(test, options.test_size, what="test_size", where=root / cls.base_folder)
    return DatasetSplits(
        train=train, test=test, num_classes=num_classes, mean=mean, std=std, image_size=(32, 32), name=name
    )
