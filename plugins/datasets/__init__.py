"""First-party dataset plugin: CIFAR-10/100 and SVHN in memory, any ImageFolder layout.

This module only declares the options and registers the factories; the loaders live in their own
modules, imported when a dataset is built (listing plugins does not import torchvision).
"""

from __future__ import annotations

from typing import Optional

import attrs

import kdtoolkit
from kdtoolkit.api import FieldError, check, one_of, positive

__all__ = [
    "CifarOptions", "ImageFolderOptions", "SVHNOptions", "build_cifar10", "build_cifar100", "build_cifar10_sample",
    "build_imagefolder", "build_svhn", "register_datasets",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_fraction = check(lambda f: 0.0 < f <= 1.0, "must be in (0, 1], got {value!r}")


def _subset_exclusive(options) -> None:
    if options.train_size is not None and options.fraction != 1.0:
        raise FieldError("fraction", f"cannot be combined with train_size (got train_size={options.train_size}, "
                                     f"fraction={options.fraction}); set one of them")


@attrs.frozen
class CifarOptions:
    """``cifar10``/``cifar100``: optional smaller splits, for quick runs.

    ``train_size``/``test_size`` keep the first N images of a split in file order (CIFAR's files are
    in random order, so the classes stay roughly balanced); ``fraction`` keeps the first
    ``round(fraction * N)`` training images instead of a count.
    """

    train_size: Optional[int] = attrs.field(default=None, validator=positive)
    test_size: Optional[int] = attrs.field(default=None, validator=positive)
    fraction: float = attrs.field(default=1.0, validator=_fraction)

    def __attrs_post_init__(self):
        _subset_exclusive(self)


@attrs.frozen
class SVHNOptions:
    """``svhn``: as ``CifarOptions``; ``include_extra`` appends the 531k "extra" images to train."""

    train_size: Optional[int] = attrs.field(default=None, validator=positive)
    test_size: Optional[int] = attrs.field(default=None, validator=positive)
    fraction: float = attrs.field(default=1.0, validator=_fraction)
    include_extra: bool = False

    def __attrs_post_init__(self):
        _subset_exclusive(self)


def _three_positive(instance, attribute, value):
    if len(value) != 3:
        raise FieldError(attribute.name, f"needs 3 values (R, G, B), got {len(value)}")
    if attribute.name == "std" and any(v <= 0 for v in value):
        raise FieldError(attribute.name, f"values must be > 0, got {value!r}")


@attrs.frozen
class ImageFolderOptions:
    """``imagefolder``: ``<root>/<train_dir>/<class>/<image>`` and ``<root>/<test_dir>/<class>/<image>``.

    ``image_size``: side of the square the model sees. ``train_crop``: ``random_resized``
    (RandomResizedCrop, ImageNet), ``pad`` (RandomCrop with ``image_size // 8`` padding, small images
    such as Tiny ImageNet) or ``auto`` (``pad`` up to 64 pixels). ``resize``: shorter side before the
    evaluation centre crop (default ``image_size / 0.875``, or ``image_size`` in ``pad`` mode).
    ``in_memory``: decode everything once into uint8 tensors, refused above ``max_memory_gib``.
    """

    train_dir: str = "train"
    test_dir: str = "val"
    image_size: int = attrs.field(default=224, validator=positive)
    resize: Optional[int] = attrs.field(default=None, validator=positive)
    train_crop: str = attrs.field(default="auto", validator=one_of(("auto", "random_resized", "pad")))
    mean: tuple[float, ...] = attrs.field(default=IMAGENET_MEAN, converter=tuple, validator=_three_positive)
    std: tuple[float, ...] = attrs.field(default=IMAGENET_STD, converter=tuple, validator=_three_positive)
    in_memory: bool = False
    max_memory_gib: float = attrs.field(default=4.0, validator=positive)

    def __attrs_post_init__(self):
        if self.resize is not None and self.resize < self.image_size:
            raise FieldError("resize", f"must be >= image_size ({self.image_size}), got {self.resize}")


def build_cifar10(options: CifarOptions | None = None, *, root, download: bool = False):
    from kdtoolkit_plugins.datasets.cifar import load_cifar

    return load_cifar("cifar10", options or CifarOptions(), root=root, download=download)


def build_cifar100(options: CifarOptions | None = None, *, root, download: bool = False):
    from kdtoolkit_plugins.datasets.cifar import load_cifar

    return load_cifar("cifar100", options or CifarOptions(), root=root, download=download)


def build_cifar10_sample(options: CifarOptions | None = None, *, root=None, download: bool = False):
    from kdtoolkit_plugins.datasets.cifar10_sample import load_cifar10_sample

    return load_cifar10_sample(options or CifarOptions())  # shipped with the package: no root, no download


def build_svhn(options: SVHNOptions | None = None, *, root, download: bool = False):
    from kdtoolkit_plugins.datasets.svhn import load_svhn

    return load_svhn(options or SVHNOptions(), root=root, download=download)


def build_imagefolder(options: ImageFolderOptions | None = None, *, root, download: bool = False):
    from kdtoolkit_plugins.datasets.imagefolder import load_imagefolder

    return load_imagefolder(options or ImageFolderOptions(), root=root, download=download)


@kdtoolkit.hookimpl
def register_datasets(register):
    register("cifar10", build_cifar10, options=CifarOptions,
             description="CIFAR-10 (Krizhevsky 2009), 32x32, 10 classes; in memory")
    register("cifar10_sample", build_cifar10_sample, options=CifarOptions,
             description="2500 train / 1000 test CIFAR-10 images shipped with kdtoolkit (bit-exact); offline")
    register("cifar100", build_cifar100, options=CifarOptions,
             description="CIFAR-100 (Krizhevsky 2009), 32x32, 100 classes; in memory")
    register("svhn", build_svhn, options=SVHNOptions,
             description="SVHN cropped digits (Netzer et al. 2011), 32x32, 10 classes; in memory; needs scipy")
    register("imagefolder", build_imagefolder, options=ImageFolderOptions,
             description="any <dir>/<class>/<image> layout (ImageNet, Tiny ImageNet); streamed or in memory")
