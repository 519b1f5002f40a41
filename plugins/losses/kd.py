"""Hinton knowledge distillation on softened logits."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from kdtoolkit_plugins.losses._util import positive, soft_kl


@attrs.frozen
class KDOptions:
    temperature: float = attrs.field(default=4.0, validator=positive)
    #: False when the method trains the teacher with this term too (mutual learning).
    detach_teacher: bool = True


class KDLoss(nn.Module):
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, mean over the batch.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
    Workshop (arXiv:1503.02531). The ``T²`` factor keeps the gradient magnitude comparable to the
    hard-label term when ``T`` changes (Sec. 2 of the paper). Unweighted: name the weight ``kd_weight``.
    """

    inputs = ("student", "teacher")
    detach: tuple[str, ...] = ("teacher",)

    def __init__(self, options: KDOptions | None = None):
        super().__init__()
        self.options = options or KDOptions()
        if not self.options.detach_teacher:
            self.detach = ()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"kd: student logits {tuple(student.shape)} vs teacher logits {tuple(teacher.shape)}")
        temperature = self.options.temperature
        return soft_kl(F.log_softmax(teacher / temperature, dim=1), student, temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.options.temperature}, detach_teacher={self.options.detach_teacher}"
