"""Cross-entropy classification loss."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn


def _label_smoothing_range(instance, attribute, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value!r}")


@attrs.frozen
class CrossEntropyOptions:
    label_smoothing: float = attrs.field(default=0.0, validator=_label_smoothing_range)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy between logits and integer class labels, batch mean.

    ``label_smoothing`` as in Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016
    (``torch.nn.functional.cross_entropy``'s definition).
    """

    inputs = ("logits", "labels")
    detach: tuple[str, ...] = ()

    def __init__(self, options: CrossEntropyOptions | None = None):
        super().__init__()
        self.options = options or CrossEntropyOptions()

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.options.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.options.label_smoothing}"
