"""Any dataset in torchvision's ImageFolder layout (``<dir>/<class>/<image>``): ImageNet, Tiny ImageNet.

Streamed by default: a ``torchvision.datasets.ImageFolder`` per split with PIL transforms, decoded in
the ``DataLoader``'s workers. ``in_memory = true`` decodes every image once into a uint8
``TensorSplit`` (resized and centre-cropped to ``image_size``), for small sets such as Tiny ImageNet;
the in-memory loader then applies its random crop with padding and flip. It refuses sets whose
decoded size exceeds ``max_memory_gib``: ImageNet is never loaded into memory.
"""

from __future__ import annotations

import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from kdtoolkit.api import ConfigError, DatasetSplits, TensorSplit
from kdtoolkit_plugins.datasets import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "build_transforms", "eval_resize", "load_imagefolder", "train_crop_mode",
]


#: "auto" crop mode picks "pad" (RandomCrop with padding) up to this image size.
SMALL_IMAGE_SIZE = 64


def train_crop_mode(options) -> str:
    """``"random_resized"`` or ``"pad"`` (resolving ``train_crop = "auto"`` by ``image_size``)."""
    if options.train_crop != "auto":
        return options.train_crop
    return "pad" if options.image_size <= SMALL_IMAGE_SIZE else "random_resized"


def eval_resize(options) -> int:
    """Shorter side before the centre crop: ``resize``, else ``image_size / 0.875`` (256 for 224) for
    large images and ``image_size`` for small ones (``pad`` mode)."""
    if options.resize is not None:
        return options.resize
    if train_crop_mode(options) == "pad":
        return options.image_size
    return round(options.image_size / 0.875)


def build_transforms(options) -> tuple[transforms.Compose, transforms.Compose]:
    """``(train, test)`` PIL transforms of the streamed splits.

    train, ``random_resized``: ``RandomResizedCrop(image_size)``, flip (ImageNet recipe);
    train, ``pad``: ``Resize``+``CenterCrop`` to ``image_size``, ``RandomCrop(image_size, padding=
    image_size // 8)``, flip (CIFAR recipe; 4 pixels at 32, 8 at 64);
    test: ``Resize(eval_resize)``, ``CenterCrop(image_size)``. All end with ``ToTensor``, ``Normalize``.
    """
    size = options.image_size
    tail = [transforms.ToTensor(), transforms.Normalize(options.mean, options.std)]
    if train_crop_mode(options) == "pad":
        train = [
            transforms.Resize(size), transforms.CenterCrop(size),
            transforms.RandomCrop(size, padding=max(1, size // 8)), transforms.RandomHorizontalFlip(),
        ]
    else:
        train = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    test = [transforms.Resize(eval_resize(options)), transforms.CenterCrop(size)]
    return transforms.Compose(train + tail), transforms.Compose(test + tail)


def _folder(root: pathlib.Path, subdir: str, transform=None) -> ImageFolder:
    path = root / subdir
    if not path.is_dir():
        raise ConfigError(
            f"imagefolder: no directory {path}; set data.root or $KDTOOLKIT_DATA, or the train_dir/test_dir "
            f"options (relative to the data root), to an ImageFolder layout <dir>/<class>/<image>"
        )
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"imagefolder: {path} is not an ImageFolder layout <class>/<image>: {exc}") from exc


def _decode_all(folder: ImageFolder, options) -> TensorSplit:
    """Decode every image of ``folder`` to uint8 ``[N, 3, S, S]`` (resize + centre crop), in threads."""
    size = options.image_size
    prepare = transforms.Compose(
        [transforms.Resize(eval_resize(options)), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    images = torch.empty((len(folder.samples), 3, size, size), dtype=torch.uint8)

    def decode(i: int) -> None:
        path, _ = folder.samples[i]
        images[i] = prepare(default_loader(path))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(folder.samples))))
    labels = torch.as_tensor([label for _, label in folder.samples], dtype=torch.int64)
    return TensorSplit(images, labels)


def load_imagefolder(options, *, root: pathlib.Path, download: bool) -> DatasetSplits:
    """``imagefolder`` splits (see ``ImageFolderOptions``). There is nothing to download."""
    root = pathlib.Path(root)
    train_transform, test_transform = build_transforms(options)
    train = _folder(root, options.train_dir, train_transform)
    test = _folder(root, options.test_dir, test_transform)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_test = sorted(set(test.classes) - set(train.classes))[:5]
        raise ConfigError(
            f"imagefolder: {root / options.train_dir} and {root / options.test_dir} have different class "
            f"folders (only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    if options.in_memory:
        count = len(train) + len(test)
        need = count * 3 * options.image_size**2
        if need > options.max_memory_gib * 2**30:
            raise ConfigError(
                f"imagefolder: in_memory would hold {count} images of {options.image_size}x{options.image_size} "
                f"= {need / 2**30:.1f} GiB, over max_memory_gib = {options.max_memory_gib}; set in_memory = false "
                f"to stream it"
            )
        train_split, test_split = _decode_all(train, options), _decode_all(test, options)
    else:
        train_split, test_split = train, test
    return DatasetSplits(
        train=train_split, test=test_split, num_classes=len(train.classes), mean=tuple(options.mean),
        std=tuple(options.std), image_size=(options.image_size, options.image_size), name="imagefolder",
    )
