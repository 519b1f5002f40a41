"""Batches for the engine: the in-memory fast path and a wrapper around ``DataLoader``.

``InMemoryLoader`` keeps a ``TensorSplit`` as uint8 and, per batch, gathers the rows by index, crops
and flips them in one gather on uint8, and converts to normalised float in one pass: no PIL, no
worker processes (the airbench recipe). On CUDA the uint8 rows are copied to the device first (or the
whole split is kept there, see ``preload``) and augmented there.

Reproducibility: the order of epoch ``e`` comes from the sampler (a pure function of its seed and
``e``), and the augmentation of batch ``b`` of epoch ``e`` from a generator seeded with
``epoch_seed(seed, e, b)``. So a run resumed at epoch ``e`` (``set_epoch(e)``) sees exactly the
batches an uninterrupted run sees, on any device.
"""

from __future__ import annotations

import random
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdtoolkit.data.augment import PADDING_MODES, crop, crop_offsets, flip_mask, normalize_constants
from kdtoolkit.data.sampler import EpochSampler, epoch_seed
from kdtoolkit.data.types import TensorSplit

__all__ = ["InMemoryLoader", "Sampler", "StreamLoader", "make_loader", "PRELOAD_LIMIT_BYTES"]

#: with ``preload=None`` a split up to this size is kept on the CUDA device whole.
PRELOAD_LIMIT_BYTES = 1 << 30


class Sampler(Protocol):
    """What a loader needs of a sampler (``EpochSampler``, ``DistributedSampler``, ...).

    ``set_epoch(epoch)`` is optional; an ``indices()`` method returning an int64 tensor is used
    instead of ``__iter__`` when present.
    """

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


def _sampler_indices(sampler) -> Tensor:
    indices = getattr(sampler, "indices", None)
    if callable(indices):
        return indices().to(torch.int64)
    return torch.as_tensor(list(iter(sampler)), dtype=torch.int64)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class InMemoryLoader:
    """Iterable of ``(images, labels)`` batches from a ``TensorSplit``.

    ``images``: ``dtype`` ``[B, C, H, W]`` on ``device``, normalised with ``mean``/``std``, randomly
    cropped (``padding`` pixels, ``padding_mode``) and flipped when ``augment``; in
    ``torch.channels_last`` memory format when ``channels_last``. ``labels``: int64 ``[B]``.

    ``sampler`` gives the indices of an epoch (default: ``EpochSampler(len(split), shuffle=augment,
    seed=seed)``); ``set_epoch`` forwards to it and selects the augmentation seeds. ``drop_last``
    drops an incomplete last batch. ``preload`` keeps the whole uint8 split on the device (``None``:
    on CUDA when it is at most ``PRELOAD_LIMIT_BYTES``); otherwise each batch is gathered on the CPU
    into pinned memory and copied with ``non_blocking``.

    The split's images are used as they are when contiguous NCHW (a one-off copy otherwise).
    """

    def __init__(
        self,
        split: TensorSplit,
        *,
        batch_size: int,
        sampler: Sampler | None = None,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        padding: int = 4,
        padding_mode: str = "zeros",
        drop_last: bool = False,
        preload: bool | None = None,
    ):
        if not isinstance(split, TensorSplit):
            raise TypeError(f"InMemoryLoader needs a TensorSplit, got {type(split).__name__} (use make_loader)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        self.device = torch.device(device)
        images = split.images if split.images.is_contiguous() else split.images.contiguous()
        channels, height, width = images.shape[1:]
        if augment and padding_mode == "reflect" and padding >= min(height, width):
            raise ValueError(f"reflect padding {padding} must be smaller than the images ({height}x{width})")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
        self.split = split
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else EpochSampler(len(split), shuffle=augment, seed=seed)
        self.augment = augment
        self.seed = seed
        self.channels_last = channels_last
        self.dtype = dtype
        self.padding = padding
        self.padding_mode = padding_mode
        self.drop_last = drop_last
        self.epoch = 0
        on_cuda = self.device.type == "cuda"
        if preload is None:
            preload = on_cuda and images.numel() <= PRELOAD_LIMIT_BYTES
        self.preload = bool(preload) and self.device.type != "cpu"
        self._pin = on_cuda and not self.preload
        if self.preload:
            self._images = images.to(self.device)
            self._labels = split.labels.to(self.device)
        else:
            self._images = images
            self._labels = split.labels
        self._scale, self._shift = normalize_constants(mean, std, uint8=True, device=self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``: the sampler's order and the augmentation seeds."""
        self.epoch = epoch
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return _num_batches(len(self.sampler), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = _sampler_indices(self.sampler)
        epoch = self.epoch
        for b in range(_num_batches(indices.shape[0], self.batch_size, self.drop_last)):
            yield self._make_batch(indices[b * self.batch_size : (b + 1) * self.batch_size], epoch, b)

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of epoch ``epoch`` alone: what iterating that epoch yields at ``index``."""
        saved = self.epoch
        self.set_epoch(epoch)
        try:
            indices = _sampler_indices(self.sampler)
        finally:
            self.set_epoch(saved)
        count = _num_batches(indices.shape[0], self.batch_size, self.drop_last)
        if not 0 <= index < count:
            raise IndexError(f"batch {index} out of range for {count} batches")
        return self._make_batch(indices[index * self.batch_size : (index + 1) * self.batch_size], epoch, index)

    def _make_batch(self, batch_indices: Tensor, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self._gather(batch_indices)
        if self.augment:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, index))
            # drawn for the whole global batch, this rank taking its positions (see EpochSampler):
            # a sample gets the same crop and flip whatever the number of processes
            share, rank = getattr(self.sampler, "world_size", 1), getattr(self.sampler, "rank", 0)
            n = batch_indices.shape[0]
            if self.padding:
                offsets = crop_offsets(n * share, self.padding, generator)[rank::share]
            else:
                offsets = torch.zeros(n, 2, dtype=torch.int64)
            flips = flip_mask(n * share, generator)[rank::share]
            images = crop(images, offsets, self.padding, padding_mode=self.padding_mode, flips=flips)
        return self._to_float(images), labels

    def _gather(self, batch_indices: Tensor) -> tuple[Tensor, Tensor]:
        if self.preload:
            batch_indices = batch_indices.to(self.device, non_blocking=True)
            return self._images.index_select(0, batch_indices), self._labels.index_select(0, batch_indices)
        n = batch_indices.shape[0]
        if self._pin:
            images = torch.empty((n, *self._images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            labels = torch.empty((n,), dtype=torch.int64, pin_memory=True)
            torch.index_select(self._images, 0, batch_indices, out=images)
            torch.index_select(self._labels, 0, batch_indices, out=labels)
            return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        images = self._images.index_select(0, batch_indices)
        labels = self._labels.index_select(0, batch_indices)
        if self.device.type != "cpu":
            images, labels = images.to(self.device), labels.to(self.device)
        return images, labels

    def _to_float(self, images: Tensor) -> Tensor:
        out = images.to(torch.float32).mul_(self._scale).sub_(self._shift)
        if self.dtype != torch.float32:
            out = out.to(self.dtype)
        if self.channels_last:
            # after the arithmetic: per-channel broadcasts over NHWC are ~3x slower on CPU
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def __repr__(self) -> str:
        return (
            f"InMemoryLoader(n={len(self.split)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"augment={self.augment}, device={self.device}, sampler={self.sampler!r})"
        )


class _EpochTagged:
    """Wraps a sampler so that each index reaches the dataset as ``(epoch, index)``: workers are
    separate processes (persistent ones keep an old copy of the dataset), so the epoch has to
    travel with the index."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededSample(Dataset):
    """``dataset[index]`` with torch's and Python's global generators seeded from
    ``(seed, epoch, index)`` for the call, then restored: the random transforms of a sample are a
    pure function of those three, whichever worker (or the main process) loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: tuple[int, int]):
        epoch, index = tagged
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        sample_seed = epoch_seed(self.seed, epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


class StreamLoader:
    """A ``DataLoader`` over a streamed ``Dataset`` that yields batches like ``InMemoryLoader``.

    Batches are moved to ``device`` (``non_blocking``; ``pin_memory`` is set on CUDA), converted to
    ``channels_last``/``dtype`` as asked; ``set_epoch`` forwards to the sampler. The dataset's own
    transforms do the augmentation, in worker processes. Reproducibility: the order of epoch ``e``
    comes from the sampler, and sample ``i`` of epoch ``e`` is loaded with torch's and Python's
    global generators seeded from ``epoch_seed(seed, e, i)`` (restored afterwards), so a resumed
    run sees the batches of an uninterrupted one, for any ``num_workers``. (Transforms that draw
    from other generators, e.g. numpy's, are not covered.)
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        sampler: Sampler,
        num_workers: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ):
        self.device = torch.device(device)
        self.sampler = sampler
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0
        self._tagged = _EpochTagged(sampler)
        self.dataloader = DataLoader(
            _SeededSample(dataset, seed),
            batch_size=batch_size,
            sampler=self._tagged,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(epoch_seed(seed, 0)),
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self._tagged.epoch = epoch
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        non_blocking = self.device.type == "cuda"
        for images, labels in self.dataloader:
            images = images.to(self.device, non_blocking=non_blocking)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=non_blocking)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if images.dtype != self.dtype:
                images = images.to(self.dtype)
            yield images, labels


def make_loader(
    split: TensorSplit | Dataset,
    *,
    batch_size: int,
    augment: bool,
    mean: Sequence[float],
    std: Sequence[float],
    sampler: Sampler | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    padding: int = 4,
    padding_mode: str = "zeros",
    drop_last: bool = False,
) -> InMemoryLoader | StreamLoader:
    """The loader for ``split``: ``InMemoryLoader`` for a ``TensorSplit``, else a ``StreamLoader``.

    Without a ``sampler`` an ``EpochSampler`` is made (``shuffle`` defaults to ``augment``: shuffle the
    training split, not the test split). ``num_workers`` applies to streamed splits only; ``augment``,
    ``mean``, ``std``, ``padding`` and ``padding_mode`` to in-memory splits only (a streamed split's
    transforms are its own).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if sampler is None:
        sampler = EpochSampler(len(split), shuffle=augment if shuffle is None else shuffle, seed=seed)
    if isinstance(split, TensorSplit):
        return InMemoryLoader(
            split, batch_size=batch_size, sampler=sampler, augment=augment, mean=mean, std=std, seed=seed,
            device=device, channels_last=channels_last, dtype=dtype, padding=padding, padding_mode=padding_mode,
            drop_last=drop_last,
        )
    return StreamLoader(
        split, batch_size=batch_size, sampler=sampler, num_workers=num_workers, seed=seed, device=device,
        channels_last=channels_last, dtype=dtype, drop_last=drop_last,
    )
