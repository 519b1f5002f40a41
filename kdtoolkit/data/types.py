"""What a dataset plugin returns."""

from __future__ import annotations

from typing import Union

import attrs
import torch
from torch.utils.data import Dataset


@attrs.frozen
class TensorSplit:
    """A split held in memory: ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``.

    The engine augments whole batches of it on tensors (random crop with padding, flip, normalize).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __attrs_post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"TensorSplit.images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("TensorSplit.labels must be [N] and match images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


#: A split is in memory (TensorSplit) or streamed (a Dataset yielding ``(float CHW tensor, int label)``).
Split = Union[TensorSplit, Dataset]


@attrs.frozen
class DatasetSplits:
    """Train and test splits of one dataset, with what the engine needs to feed a model.

    ``mean``/``std`` normalise ``TensorSplit`` images (per channel, on the 0-1 scale); streamed
    splits apply their own transforms. ``image_size`` is the (H, W) a model sees.
    """

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    name: str = ""
