"""SVHN (cropped digits, 32x32) in memory, from torchvision's on-disk layout.

Netzer et al., "Reading Digits in Natural Images with Unsupervised Feature Learning", NIPS 2011
Workshop. torchvision keeps the ``.mat`` files directly in ``root`` (``train_32x32.mat``,
``test_32x32.mat``, ``extra_32x32.mat``); reading them needs scipy. Labels are 0-9 (torchvision maps
the files' "10" to 0). As for CIFAR, existing files are used without an md5 check.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from torchvision.datasets import SVHN

from kdtoolkit.api import ConfigError, DatasetSplits, TensorSplit
from kdtoolkit_plugins.datasets.cifar import fraction_size, subset

__all__ = ["SVHN_MEAN", "SVHN_STD", "LocalSVHN", "load_svhn"]

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


class LocalSVHN(SVHN):
    """torchvision's SVHN reading a local file without an md5 match; ``download()`` is torchvision's
    (``download_url`` skips a file whose md5 matches and checks what it fetches)."""

    def _check_integrity(self) -> bool:
        return pathlib.Path(self.root, self.filename).is_file()


def _to_split(dataset: SVHN) -> TensorSplit:
    # torchvision already transposed the .mat's HWCN to NCHW.
    return TensorSplit(
        torch.from_numpy(dataset.data).contiguous(), torch.as_tensor(dataset.labels, dtype=torch.int64)
    )


def load_svhn(options, *, root: pathlib.Path, download: bool) -> DatasetSplits:
    """``svhn`` as in-memory ``TensorSplit``s (see ``SVHNOptions``)."""
    if importlib.util.find_spec("scipy") is None:
        raise ConfigError("svhn: reading SVHN's .mat files needs scipy; install it with `pip install scipy` (or `pip install kdtoolkit[svhn]`)")
    root = pathlib.Path(root)
    splits = ["train", "test"] + (["extra"] if options.include_extra else [])
    if not download:
        missing = [SVHN.split_list[s][1] for s in splits if not (root / SVHN.split_list[s][1]).is_file()]
        if missing:
            raise ConfigError(
                f"svhn: missing {', '.join(missing)} in {root}; set data.root or $KDTOOLKIT_DATA to the "
                f"directory that holds the SVHN .mat files, or set data.download = true"
            )
    try:
        loaded = {s: _to_split(LocalSVHN(str(root), split=s, download=download)) for s in splits}
    except RuntimeError as exc:
        raise ConfigError(f"svhn: could not load SVHN from {root}: {exc}") from exc
    except OSError as exc:  # a failed download (URLError is an OSError)
        raise ConfigError(f"svhn: download to {root} failed: {exc}") from exc
    train = loaded["train"]
    if options.include_extra:
        extra = loaded["extra"]
        train = TensorSplit(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]))
    train_size = options.train_size
    if options.fraction != 1.0:
        train_size = fraction_size(len(train), options.fraction)
    train = subset(train, train_size, what="train_size", where=root)
    test = subset(loaded["test"], options.test_size, what="test_size", where=root)
    return DatasetSplits(
        train=train, test=test, num_classes=10, mean=SVHN_MEAN, std=SVHN_STD, image_size=(32, 32), name="svhn"
    )
