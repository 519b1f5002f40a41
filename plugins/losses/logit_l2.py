"""Squared L2 distance between logits (CTKD's "highlight every step" term)."""

from __future__ import annotations

import attrs
from torch import Tensor, nn


@attrs.frozen
class LogitL2Options:
    """No options: the target is always detached."""


class LogitL2Loss(nn.Module):
    """``(1/B) · ‖sg(z_t) − z_s‖²``: squared error summed over classes, mean over the batch.

    Zhao et al., "Highlight Every Step: Knowledge Distillation via Collaborative Teaching",
    IEEE Transactions on Cybernetics 2022 (arXiv:1907.09643): the student follows the scratch
    teacher's temporary logits at every step. The target is always detached: the scratch teacher
    must get no gradient from this term.
    """

    inputs = ("student", "teacher")
    detach: tuple[str, ...] = ("teacher",)

    def __init__(self, options: LogitL2Options | None = None):
        super().__init__()
        self.options = options or LogitL2Options()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"logit_l2: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
        diff = teacher - student  # the core detaches the teacher (``detach``)
        return diff.pow(2).flatten(1).sum(1).mean()
