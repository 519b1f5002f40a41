"""Attention transfer: match the spatial attention maps of student and teacher features."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtoolkit_plugins.losses._util import as_shape_list, pairs, positive

FORMS = ("reference", "paper")


@attrs.frozen
class AttentionOptions:
    #: exponent of the attention mapping ``mean_c |F|^p`` (the paper's F^p_sum / channels; p = 2 default).
    p: float = attrs.field(default=2.0, validator=positive)
    #: "reference": ``mean_{b,hw} (a_s − a_t)²`` (the authors' code); "paper": ``mean_b ‖a_s − a_t‖_norm``.
    form: str = attrs.field(default="reference", validator=attrs.validators.in_(FORMS))
    #: norm type of the "paper" form (the paper uses 2); unused by the "reference" form.
    norm: float = attrs.field(default=2.0, validator=positive)
    #: when spatial sizes differ: True adaptive-average-pools the larger feature to the smaller size;
    #: False raises an error (default: a size mismatch usually means a wrong layer pairing).
    pool_mismatch: bool = False
    detach_teacher: bool = True


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """``normalize(mean_c |F|^p)`` flattened per sample: shape ``(B, H·W)``, unit L2 norm per row."""
    if feature.dim() < 3:
        raise ValueError(f"attention needs (B, C, H, W)-like features, got shape {tuple(feature.shape)}")
    energy = feature.pow(2) if p == 2 else feature.abs().pow(p)
    return F.normalize(energy.mean(1).flatten(1), dim=1)


class AttentionLoss(nn.Module):
    """Activation-based attention transfer.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

    Attention map of a feature ``F`` (B, C, H, W): ``a(F) = normalize(mean_c |F|^p).flatten()`` per
    sample (L2 normalisation; ``p = 2`` by default; the mean over channels only rescales, and the
    normalisation removes the scale). Summed over the given layer pairs (``student``/``teacher`` may
    be lists of tensors), per pair:

    - ``form = "reference"`` (default), the authors' released code (``at_loss``):
      ``mean_{b, hw} (a_s − a_t)²``. Use with β = 1000 on CIFAR (the code multiplies by β/2 — the
      weight here is the engine's, this loss is unweighted).
    - ``form = "paper"``, Eq. (2) of the paper without its β/2: ``mean_b ‖a_s/‖a_s‖₂ − a_t/‖a_t‖₂‖_norm``
      (a non-squared norm of the difference of L2-normalised maps, ``norm = 2`` by default), averaged
      over the batch.

    Channel counts may differ. Spatial sizes must match; with ``pool_mismatch = true`` both features
    are adaptive-average-pooled to the smaller height and width (as RepDistiller does), otherwise a
    mismatch raises ``ValueError``. The teacher side is detached unless ``detach_teacher = false``.
    """

    inputs = ("student", "teacher")
    detach: tuple[str, ...] = ("teacher",)

    def __init__(self, options: AttentionOptions | None = None):
        super().__init__()
        self.options = options or AttentionOptions()
        if not self.options.detach_teacher:
            self.detach = ()

    def setup(self, shapes) -> None:
        """Check pair counts and spatial sizes before training (fail early, not at the first step)."""
        s, t = as_shape_list(shapes["student"]), as_shape_list(shapes["teacher"])
        if len(s) != len(t):
            raise ValueError(f"attention: {len(s)} student features but {len(t)} teacher features")
        for k, (ss, ts) in enumerate(zip(s, t)):
            self._check_spatial(k, ss, ts)

    def _check_spatial(self, k: int, ss: torch.Size, ts: torch.Size) -> None:
        if len(ss) < 3 or len(ts) < 3:
            raise ValueError(f"attention pair {k}: need (B, C, H, W) features, got {tuple(ss)} and {tuple(ts)}")
        if ss[2:] != ts[2:] and not (self.options.pool_mismatch and len(ss) == len(ts) == 4):
            raise ValueError(
                f"attention pair {k}: spatial sizes differ, student {tuple(ss[2:])} vs teacher {tuple(ts[2:])}; "
                "pair layers of the same resolution or set pool_mismatch = true"
            )

    def forward(self, student, teacher) -> Tensor:
        total = None
        for k, (fs, ft) in enumerate(pairs(student, teacher)):
            self._check_spatial(k, fs.shape, ft.shape)
            if fs.shape[2:] != ft.shape[2:]:
                size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
                fs, ft = F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)
            diff = attention_map(fs, self.options.p) - attention_map(ft, self.options.p)
            if self.options.form == "reference":
                term = diff.pow(2).mean()
            else:
                term = torch.linalg.vector_norm(diff, ord=self.options.norm, dim=1).mean()
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        o = self.options
        return f"p={o.p}, form={o.form!r}, pool_mismatch={o.pool_mismatch}, detach_teacher={o.detach_teacher}"
