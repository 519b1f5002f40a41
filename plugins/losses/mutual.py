"""Mutual-learning losses over a list of networks' logits: KDCL-MinLogit, DML, averaged-logit ensemble."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtoolkit.api import positive
from kdtoolkit_plugins.losses._util import check_logits_list, soft_kl


@attrs.frozen
class MinLogitOptions:
    temperature: float = attrs.field(default=4.0, validator=positive)


@attrs.frozen
class DMLOptions:
    #: DML uses plain softmax (T = 1) in the paper.
    temperature: float = attrs.field(default=1.0, validator=positive)


@attrs.frozen
class EnsembleKDOptions:
    temperature: float = attrs.field(default=4.0, validator=positive)


def minlogit_ensemble(logits: list[Tensor], labels: Tensor) -> Tensor:
    """KDCL-MinLogit ensemble: shift each ``z^i`` so its target-class logit is 0, element-wise min."""
    if labels is None:
        raise ValueError("minlogit needs the labels (the target class of each sample)")
    index = labels.long().view(-1, 1)
    shifted = [z - z.gather(1, index) for z in logits]
    return torch.stack(shifted).amin(dim=0)


class _MutualLoss(nn.Module):
    """Shared shape: ``logits`` is a **list** of logit tensors (one per network, same shape)."""

    inputs = ("logits", "labels")
    #: no input is a pure target: every network is trained; the ensemble target is detached inside.
    detach: tuple[str, ...] = ()
    name = "mutual"

    def __init__(self, options):
        super().__init__()
        self.options = options

    def per_network(self, logits: list[Tensor], labels: Tensor | None = None) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, logits: list[Tensor], labels: Tensor | None = None) -> Tensor:
        return torch.stack(self.per_network(logits, labels)).sum()

    def extra_repr(self) -> str:
        return f"temperature={self.options.temperature}"


class MinLogitLoss(_MutualLoss):
    """KDCL-MinLogit mutual learning: ``Σ_i T²·KL(p^e ‖ softmax(z^i/T))``.

    Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020 (KDCL-MinLogit);
    used as the mutual-learning term of Pham et al., CMT-KD, WACV 2023 (Eqs. 7-9). With
    ``z̃^i = z^i − z^i_y`` (target class shifted to 0), ``z^e = min_i z̃^i`` element-wise and
    ``p^e = softmax(z^e/T)`` detached. ``logits`` is a list (≥ 2 networks); ``labels`` the class
    indices. ``per_network`` gives the term of each network (the loss is their sum).
    """

    name = "minlogit"

    def __init__(self, options: MinLogitOptions | None = None):
        super().__init__(options or MinLogitOptions())

    def per_network(self, logits, labels=None):
        logits = check_logits_list(logits, self.name)
        temperature = self.options.temperature
        target = F.log_softmax(minlogit_ensemble(logits, labels).detach() / temperature, dim=1)
        return [soft_kl(target, z, temperature) for z in logits]


class DMLLoss(_MutualLoss):
    """Deep mutual learning: network ``i`` gets ``Σ_{j≠i} T²·KL(sg(p_j) ‖ p_i) / (n−1)``; summed over i.

    Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384), Eq. (10) for
    more than two networks. ``p = softmax(z/T)``, T = 1 by default as in the paper. ``logits`` is a
    list (≥ 2 networks); ``labels`` is accepted and unused.
    """

    name = "dml"

    def __init__(self, options: DMLOptions | None = None):
        super().__init__(options or DMLOptions())

    def per_network(self, logits, labels=None):
        logits = check_logits_list(logits, self.name)
        temperature, n = self.options.temperature, len(logits)
        targets = [F.log_softmax(z.detach() / temperature, dim=1) for z in logits]
        terms = []
        for i, z in enumerate(logits):
            kls = [soft_kl(targets[j], z, temperature) for j in range(n) if j != i]
            terms.append(torch.stack(kls).sum() / (n - 1))
        return terms


class EnsembleKDLoss(_MutualLoss):
    """Averaged-logit ensemble distillation: ``Σ_i T²·KL(sg(softmax(mean_j z^j / T)) ‖ softmax(z^i/T))``.

    The "naive" logit-averaging ensemble of Guo et al., CVPR 2020 (KDCL, the baseline beside
    MinLogit) and of Lan et al., "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018
    (with uniform gates). ``logits`` is a list (≥ 2 networks); ``labels`` is accepted and unused.
    """

    name = "ensemble_kd"

    def __init__(self, options: EnsembleKDOptions | None = None):
        super().__init__(options or EnsembleKDOptions())

    def per_network(self, logits, labels=None):
        logits = check_logits_list(logits, self.name)
        temperature = self.options.temperature
        mean = torch.stack(logits).mean(dim=0).detach()
        target = F.log_softmax(mean / temperature, dim=1)
        return [soft_kl(target, z, temperature) for z in logits]
