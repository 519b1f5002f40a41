"""FitNet hints: regress the student's feature onto the teacher's."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtoolkit_plugins.losses._util import as_shape_list, pairs


@attrs.frozen
class FitNetOptions:
    #: append a ReLU to the regressor (1x1 conv + BN [+ ReLU]).
    relu: bool = False
    detach_teacher: bool = True


def make_regressor(student_shape: torch.Size, teacher_shape: torch.Size, relu: bool) -> nn.Module:
    """1x1 conv + BN (+ ReLU) from student to teacher channels; Linear + BN1d for (B, C) features."""
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
        raise ValueError(
            f"fitnet: need two (B, C, H, W) or two (B, C) features, got {tuple(student_shape)} and {tuple(teacher_shape)}"
        )
    if student_shape[2:] != teacher_shape[2:]:
        raise ValueError(
            f"fitnet: spatial sizes differ, student {tuple(student_shape[2:])} vs teacher {tuple(teacher_shape[2:])}; "
            "pair layers of the same resolution"
        )
    cs, ct = student_shape[1], teacher_shape[1]
    if len(student_shape) == 4:
        layers = [nn.Conv2d(cs, ct, kernel_size=1, bias=False), nn.BatchNorm2d(ct)]
    else:
        layers = [nn.Linear(cs, ct, bias=False), nn.BatchNorm1d(ct)]
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class FitNetLoss(nn.Module):
    """``MSE(r(F_s), F_t)`` with a learned regressor ``r`` per layer pair, summed over pairs.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550). The regressor
    (1x1 conv + BN, ReLU optional) is built by ``setup(shapes)`` from the two shapes, one per pair;
    its parameters belong to this module (saved in checkpoints, trained with the student). The MSE is
    the mean over all elements. The teacher side is detached unless ``detach_teacher = false``.
    The two-stage original (hint stage, then KD) is a schedule of the loss weights.
    """

    inputs = ("student", "teacher")
    detach: tuple[str, ...] = ("teacher",)

    def __init__(self, options: FitNetOptions | None = None):
        super().__init__()
        self.options = options or FitNetOptions()
        if not self.options.detach_teacher:
            self.detach = ()
        self.regressors = nn.ModuleList()
        self._shapes: list[tuple[torch.Size, torch.Size]] | None = None

    def setup(self, shapes) -> None:
        """Build one regressor per (student, teacher) pair; idempotent for the same shapes."""
        s, t = as_shape_list(shapes["student"]), as_shape_list(shapes["teacher"])
        if len(s) != len(t):
            raise ValueError(f"fitnet: {len(s)} student features but {len(t)} teacher features")
        # only channels and spatial size matter (batch size may change between calls)
        key = [(ss[1:], ts[1:]) for ss, ts in zip(s, t)]
        if self._shapes is not None:
            if key != self._shapes:
                raise ValueError(f"fitnet: setup already called with other shapes {self._shapes}, now {key}")
            return
        self.regressors = nn.ModuleList(make_regressor(ss, ts, self.options.relu) for ss, ts in zip(s, t))
        self._shapes = key

    def forward(self, student, teacher) -> Tensor:
        pair_list = pairs(student, teacher)
        if self._shapes is None:
            raise RuntimeError("fitnet: call setup(shapes) before the first forward (it builds the regressors)")
        if len(pair_list) != len(self.regressors):
            raise ValueError(f"fitnet: built for {len(self.regressors)} pairs, got {len(pair_list)}")
        total = None
        for regressor, (fs, ft) in zip(self.regressors, pair_list):
            term = F.mse_loss(regressor(fs), ft)
            total = term if total is None else total + term
        return total
