"""The one place that knows about multi-process training (``torchrun``).

Single-process runs go through the same functions, which then do nothing. Later work plugs DDP in
here: ``wrap_model`` is the only place models are wrapped, ``make_sampler`` the only place samplers
are made, and ``is_main`` gates all file and console output.
"""

from __future__ import annotations

import os

import attrs
import torch
from torch import nn

from kdtoolkit.data.sampler import EpochSampler
from kdtoolkit.errors import ConfigError


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def make_sampler(n: int, *, shuffle: bool, seed: int, drop_last: bool, info: DistInfo) -> EpochSampler:
    return EpochSampler(n, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=info.rank, world_size=info.world_size)


def refuse_multiprocess() -> None:
    """Several processes (``torchrun``, ``WORLD_SIZE > 1``) are not supported yet: refuse, rather
    than let every process train alone as rank 0 and write the same run directory."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):
        raise ConfigError(
            f"WORLD_SIZE={world}: training on several processes is not supported yet; run one process "
            "(python -m kdtoolkit run ..., without torchrun)"
        )


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The model itself: multi-process training is refused by ``refuse_multiprocess``."""
    return model
