"""A complete third-party kdtoolkit plugin: one distillation loss.

``l1_logits``: mean absolute difference between the student's logits and the teacher's detached
logits, ``mean_b sum_c |z_s - sg(z_t)| / C``.
"""

import attrs
import torch
from torch import nn

import kdtoolkit


@attrs.frozen
class L1LogitsOptions:
    scale: float = 1.0


class L1Logits(nn.Module):
    inputs = ("student", "teacher")
    detach = ("teacher",)

    def __init__(self, options: L1LogitsOptions):
        super().__init__()
        self.scale = options.scale

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.scale * (student - teacher.detach()).abs().mean()


@kdtoolkit.hookimpl
def register_losses(register):
    register("l1_logits", L1Logits, options=L1LogitsOptions, description="L1 distance to the teacher's logits")
