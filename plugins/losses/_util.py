"""Small helpers shared by the loss plugins (no registration here)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A tensor or a list/tuple of tensors, as a list (one entry per layer pair or network)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def as_shape_list(shape) -> list[torch.Size]:
    """``torch.Size`` (or a tuple of ints) or a list of them, as a list of ``torch.Size``."""
    if isinstance(shape, torch.Size) or (
        isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape)
    ):
        return [torch.Size(shape)]
    return [torch.Size(s) for s in shape]


def pairs(student, teacher) -> list[tuple[Tensor, Tensor]]:
    """Zip student/teacher tensors (or lists of them), checking that the counts agree."""
    s, t = as_list(student), as_list(teacher)
    if len(s) != len(t):
        raise ValueError(f"got {len(s)} student features but {len(t)} teacher features; pair them one to one")
    if not s:
        raise ValueError("no feature pairs given")
    return list(zip(s, t))


def soft_kl(target_log_prob: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(p ‖ softmax(logits / T))``, batch mean, with ``p`` given as log-probabilities.

    The target is used as given: detach it before calling if it must get no gradient.
    """
    log_q = F.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(log_q, target_log_prob, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def check_logits_list(logits, name: str, minimum: int = 2) -> list[Tensor]:
    items = as_list(logits)
    if len(items) < minimum:
        raise ValueError(f"{name} needs a list of at least {minimum} logit tensors (one per network), got {len(items)}")
    shape = items[0].shape
    for i, z in enumerate(items):
        if z.shape != shape:
            raise ValueError(f"{name}: logits[{i}] has shape {tuple(z.shape)}, logits[0] has {tuple(shape)}")
    return items


