"""What the core expects of a model, beyond ``nn.Module``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class StagedModel(Protocol):
    """A model that can run stage by stage (CMT-KD fuses teacher features between stages).

    ``stage_paths[k]`` is the dotted module path whose output ends stage ``k``; ``forward_stage(k, x)``
    maps stage k's input (the image for k = 0, else the output of stage k - 1) to that output, and
    ``forward_stage(len(stage_paths), x)`` is the head that gives logits. ``forward(x)`` equals the
    chain of all stages. Attention/feature losses use ``stage_paths`` as the default feature layers.
    """

    stage_paths: tuple[str, ...]

    def forward_stage(self, k: int, x: torch.Tensor) -> torch.Tensor: ...


def run_stages(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward`` through ``forward_stage``: used by tests to check a model honours the protocol."""
    for k in range(len(model.stage_paths) + 1):
        x = model.forward_stage(k, x)
    return x
