"""First-party fusion plugin: how several teachers' outputs become one target.

Factory contract: ``factory(options, *, num_inputs) -> nn.Module`` with
``forward(tensors: list[Tensor], temperature: float | None = None) -> Tensor``.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdtoolkit
from kdtoolkit_plugins.losses.mutual import minlogit_ensemble


@attrs.frozen
class AvgLogitsOptions:
    """No options."""


@attrs.frozen
class AvgSoftmaxOptions:
    """No options (the temperature is a forward argument)."""


@attrs.frozen
class MinLogitFusionOptions:
    """No options."""


@attrs.frozen
class ImportanceOptions:
    #: initial importance logits π (length = number of inputs); None: zeros (uniform weights).
    init: Optional[tuple[float, ...]] = None


class _Fusion(nn.Module):
    def __init__(self, options, *, num_inputs: int):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"a fusion needs at least one input, got num_inputs={num_inputs}")
        self.options = options
        self.num_inputs = num_inputs

    def _stack(self, tensors) -> Tensor:
        tensors = list(tensors)
        if len(tensors) != self.num_inputs:
            raise ValueError(f"{type(self).__name__} was built for {self.num_inputs} inputs, got {len(tensors)}")
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{type(self).__name__}: inputs have different shapes {sorted(shapes)}")
        return torch.stack(tensors)

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}"


class AvgLogits(_Fusion):
    """Mean of the inputs (logits or features): ``mean_i z_i``. The temperature is ignored."""

    def __init__(self, options: AvgLogitsOptions | None = None, *, num_inputs: int):
        super().__init__(options or AvgLogitsOptions(), num_inputs=num_inputs)

    def forward(self, tensors, temperature: float | None = None) -> Tensor:
        return self._stack(tensors).mean(dim=0)


class AvgSoftmax(_Fusion):
    """Average of the softened distributions, returned as logits: ``T · log(mean_i softmax(z_i/T))``.

    ``softmax(output / T)`` equals ``mean_i softmax(z_i / T)`` exactly (the output is a normalised
    log-probability times T), so any logit loss at the same ``T`` (e.g. ``kd``) distils the averaged
    distribution — the "average teacher" of CMT-KD's ablation (Pham et al., WACV 2023, Table 1).
    ``temperature`` defaults to 1 when None. Computed with logsumexp for stability.
    """

    def __init__(self, options: AvgSoftmaxOptions | None = None, *, num_inputs: int):
        super().__init__(options or AvgSoftmaxOptions(), num_inputs=num_inputs)

    def forward(self, tensors, temperature: float | None = None) -> Tensor:
        t = 1.0 if temperature is None else float(temperature)
        log_probs = F.log_softmax(self._stack(tensors) / t, dim=2)
        return t * (torch.logsumexp(log_probs, dim=0) - math.log(self.num_inputs))


class MinLogitFusion(_Fusion):
    """KDCL-MinLogit ensemble (Guo et al., CVPR 2020): shift each ``z_i`` so the target class is 0,
    then take the element-wise minimum. Needs ``labels``; the temperature is ignored (the shift and
    min commute with dividing by T > 0). Not detached: detach the result if it is a target."""

    def __init__(self, options: MinLogitFusionOptions | None = None, *, num_inputs: int):
        super().__init__(options or MinLogitFusionOptions(), num_inputs=num_inputs)

    def forward(self, tensors, temperature: float | None = None, labels: Tensor | None = None) -> Tensor:
        stacked = self._stack(tensors)
        if labels is None:
            raise ValueError("minlogit fusion needs labels: forward(tensors, labels=labels)")
        return minlogit_ensemble(list(stacked.unbind(0)), labels)


class ImportanceFusion(_Fusion):
    """Learnable importance weights: ``Σ_i softmax(π)_i · A_i``.

    CMT-KD Eq. (1) (Pham, Hoang, Do, "Collaborative Multi-Teacher Knowledge Distillation for Learning
    Low Bit-width Deep Neural Networks", WACV 2023). ``π`` (one per input, zeros → uniform weights
    unless ``init``) is this module's parameter; gradients reach ``π`` and every input. Works for logits
    and for features of any shape. The temperature is ignored. ``weights()`` gives ``softmax(π)``
    detached, for logging.
    """

    def __init__(self, options: ImportanceOptions | None = None, *, num_inputs: int):
        super().__init__(options or ImportanceOptions(), num_inputs=num_inputs)
        init = self.options.init
        if init is None:
            init = (0.0,) * num_inputs
        if len(init) != num_inputs:
            raise ValueError(f"importance fusion: init has {len(init)} values for {num_inputs} inputs")
        self.importance = nn.Parameter(torch.tensor([float(v) for v in init]))

    def forward(self, tensors, temperature: float | None = None) -> Tensor:
        stacked = self._stack(tensors)
        weights = torch.softmax(self.importance, dim=0).to(stacked.dtype)
        return (weights.view(-1, *([1] * (stacked.dim() - 1))) * stacked).sum(dim=0)

    def weights(self) -> Tensor:
        return torch.softmax(self.importance.detach(), dim=0)


@kdtoolkit.hookimpl
def register_fusions(register):
    register("avg_logits", AvgLogits, options=AvgLogitsOptions, description="mean of the logits (or features)")
    register("avg_softmax", AvgSoftmax, options=AvgSoftmaxOptions,
             description="mean of softmax(z_i/T), returned as logits T·log(mean) for any logit loss")
    register("minlogit", MinLogitFusion, options=MinLogitFusionOptions, needs_labels=True,
             description="KDCL-MinLogit (Guo et al. CVPR 2020): target class shifted to 0, element-wise min; needs labels")
    register("importance", ImportanceFusion, options=ImportanceOptions,
             description="CMT-KD Eq. 1 (Pham et al. WACV 2023): Σ softmax(π)_i·A_i with learnable π")
