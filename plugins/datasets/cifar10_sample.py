"""``cifar10_sample``: 2500 training and 1000 test images of CIFAR-10, shipped with the package.

The original pixels and labels, bit for bit (Krizhevsky 2009): the first 500 images of each of the
five training batch files and the first 1000 of the test batch, stored as uint8 safetensors (10.3 MiB;
no pickle, no network, no data root). Built by ``make_cifar10_sample.py`` beside it; the file's sha256 is
checked on load. Small enough that the quickstart trains, distils and quantizes in minutes on a CPU,
large enough to learn something: for the full CIFAR-10 use the ``cifar10`` dataset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import load

from kdtoolkit.api import ConfigError, DatasetSplits, TensorSplit

FILE = Path(__file__).with_name("cifar10_sample.safetensors")
SHA256 = "28ce4766abcd7dd2cce2760fdd841af57522db1461348b249ca0bee277f83270"
TRAIN, TEST = 2500, 1000


def load_cifar10_sample(options) -> DatasetSplits:
    """The embedded sample as in-memory splits; ``options`` as ``CifarOptions`` (train_size, test_size,
    fraction keep the first rows). Normalised with the full CIFAR-10 statistics, like ``cifar10``."""
    from kdtoolkit_plugins.datasets.cifar import CIFAR10_MEAN, CIFAR10_STD, fraction_size, subset

    try:
        blob = FILE.read_bytes()
    except OSError as exc:
        raise ConfigError(problems=[("data.name", f"cifar10_sample: cannot read {FILE} ({exc.strerror}); reinstall kdtoolkit")]) from None
    if hashlib.sha256(blob).hexdigest() != SHA256:
        raise ConfigError(problems=[("data.name", f"cifar10_sample: {FILE} is damaged (sha256 mismatch); reinstall kdtoolkit")])
    tensors = load(blob)
    train = TensorSplit(tensors["train_images"], tensors["train_labels"])
    test = TensorSplit(tensors["test_images"], tensors["test_labels"])
    train_size = options.train_size
    if options.fraction != 1.0:
        train_size = fraction_size(len(train), options.fraction)
    train = subset(train, train_size, what="train_size", where=FILE)
    test = subset(test, options.test_size, what="test_size", where=FILE)
    return DatasetSplits(
        train=train, test=test, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD, image_size=(32, 32),
        name="cifar10_sample",
    )
