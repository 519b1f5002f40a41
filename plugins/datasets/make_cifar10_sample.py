"""Build ``plugins/datasets/cifar10_sample.safetensors`` from the bit-exact CIFAR-10 subset.

    python -m kdtoolkit_plugins.datasets.make_cifar10_sample SUBSET_DIR   # holds cifar-10-batches-py/ (the exact subset)

The subset holds the first 1017 images of each original CIFAR-10 batch file; the sample keeps the first
500 of each of the five training batches (2500 images, in batch order) and the first 1000 of the test
batch, as uint8 NCHW tensors and int64 labels. Pixels and labels are the original ones, bit for bit.
The source pickles are read only here, by the maintainer, from files whose md5 is checked first.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TRAIN_PER_BATCH = 500
TEST = 1000
SOURCE_MD5 = {
    "data_batch_1": "740abca5c549054ac878f09aaabd249f",
    "data_batch_2": "536b4828bbb40dc3cd88f131441ac5bc",
    "data_batch_3": "dc722e17ad4c8be363325aa9260c0776",
    "data_batch_4": "2db28d979de1df9ed8b97e19cebc4642",
    "data_batch_5": "5afd5c3ce7167ddd21d5574b4b11d4c0",
    "test_batch": "3444cc9212727b90d321e6cdefbc03b3",
}
OUT = Path(__file__).resolve().parents[1] / "plugins" / "datasets" / "cifar10_sample.safetensors"


def read_batch(path: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != SOURCE_MD5[path.name]:
        sys.exit(f"{path}: md5 {digest}, expected {SOURCE_MD5[path.name]} (not the exact subset)")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # trusted, checked file; never done at run time
    return batch["data"][:rows], np.asarray(batch["labels"][:rows], dtype=np.int64)


def main(subset: str) -> None:
    base = Path(subset) / "cifar-10-batches-py"
    train = [read_batch(base / f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)]
    test = read_batch(base / "test_batch", TEST)

    def images(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows)).reshape(-1, 3, 32, 32).contiguous()

    tensors = {
        "train_images": images(np.concatenate([d for d, _ in train])),
        "train_labels": torch.from_numpy(np.concatenate([l for _, l in train])),
        "test_images": images(test[0]),
        "test_labels": torch.from_numpy(test[1]),
    }
    save_file(tensors, str(OUT), metadata={
        "source": "CIFAR-10 (Krizhevsky 2009), original pixels and labels",
        "train": f"first {TRAIN_PER_BATCH} images of each of data_batch_1..5",
        "test": f"first {TEST} images of test_batch",
    })
    print(f"wrote {OUT} ({OUT.stat().st_size / 2**20:.2f} MiB), sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
