"""Epoch-indexed sampling: the order of an epoch is a pure function of (seed, epoch)."""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = ["EpochSampler", "epoch_seed"]

_PRIME = 1_000_003
_MASK = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """Deterministic 63-bit seed from ``(seed, epoch, ...)``: ``seed * 1_000_003 + epoch`` and so on."""
    value = seed
    for part in (epoch, *more):
        value = (value * _PRIME + part) & _MASK
    return value


class EpochSampler:
    """Indices ``0..n-1`` for one epoch, shuffled by a generator seeded from ``(seed, epoch)``.

    A resumed run that calls ``set_epoch(e)`` gets exactly the order of an uninterrupted run. For
    distributed training each rank takes ``indices[rank::world_size]`` of the epoch's order, as
    ``torch.utils.data.DistributedSampler`` does: with ``drop_last`` the tail that does not divide
    evenly is dropped, otherwise the order is padded with its own first indices so every rank gets
    ``ceil(n / world_size)``. (``drop_last`` here is about ranks; the loader drops incomplete
    batches.) ``pad=False`` (evaluation) neither pads nor drops: rank ``r`` takes
    ``indices[r::world_size]``, so every sample is seen exactly once over the ranks.

    With ``world_size`` ranks and a per-rank batch of ``B``, batch ``b`` of all ranks together is
    batch ``b`` of one process with a batch of ``world_size * B`` (rank ``r`` holds its positions
    ``r, r + world_size, ...``): the same samples per optimizer step whatever the number of ranks.
    """

    def __init__(
        self, n: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
        pad: bool = True,
    ):
        if n < 0:
            raise ValueError(f"EpochSampler: n must be >= 0, got {n}")
        if world_size < 1:
            raise ValueError(f"EpochSampler: world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank must be in [0, {world_size}), got {rank}")
        if drop_last and n < world_size:
            raise ValueError(f"EpochSampler: {n} samples cannot be split over {world_size} ranks with drop_last")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        if not pad:
            self.num_samples = len(range(rank, n, world_size))
        elif drop_last:
            self.num_samples = n // world_size
        else:
            self.num_samples = math.ceil(n / world_size)
        self.total_size = self.num_samples * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, as an int64 tensor (the loader's fast path)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        if not self.pad:
            return order[self.rank :: self.world_size]
        if self.total_size > self.n:  # pad by repeating the order from its start
            reps = math.ceil(self.total_size / max(self.n, 1))
            order = order.repeat(reps)
        order = order[: self.total_size]
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"EpochSampler(n={self.n}, shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.world_size}, drop_last={self.drop_last})"
        )
