"""Quantization-aware conv and linear layers.

:class:`QConv2d` and :class:`QLinear` subclass ``nn.Conv2d`` / ``nn.Linear`` and keep their
parameters, so a quantized model has the same parameter names and module paths as the float one
(``block1.0.conv1.weight`` stays ``block1.0.conv1.weight``). The fake-quantizers are two child
modules:

* ``act_quantizer``: applied to the layer's **input** (for HWGQ it plays the part of the ReLU in
  front of the layer; our models feed convs with ReLU outputs, which are >= 0);
* ``weight_quantizer``: applied to ``weight`` on every forward.

Either is ``None`` for full precision. :meth:`QConv2d.convert` turns an existing layer into a
quantized one *in place* (its class is swapped), so forward hooks, optimiser references and
parameter identity survive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.quant.base import FULL_PRECISION, QuantizedWeight


class QuantLayer:
    """Mixin with what :class:`QConv2d` and :class:`QLinear` share."""

    #: the float layer type this class quantizes
    float_type: type[nn.Module]
    weight_quantizer: nn.Module | None
    act_quantizer: nn.Module | None

    @property
    def weight_bits(self) -> int:
        return FULL_PRECISION if self.weight_quantizer is None else self.weight_quantizer.bits

    @property
    def act_bits(self) -> int:
        return FULL_PRECISION if self.act_quantizer is None else self.act_quantizer.bits

    def _set_quantizers(self, weight_quantizer: nn.Module | None, act_quantizer: nn.Module | None) -> None:
        # add_module registers None too, so the attributes always exist and print in repr
        self.add_module("weight_quantizer", weight_quantizer)
        self.add_module("act_quantizer", act_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (fake-quantized), without autograd."""
        with torch.no_grad():
            return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _quantize_io(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.act_quantizer is not None:
            input = self.act_quantizer(input)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return input, weight

    @classmethod
    def convert(cls, module: nn.Module, weight_quantizer: nn.Module | None, act_quantizer: nn.Module | None):
        """Turn ``module`` (an instance of the float base class) into ``cls`` in place and return it."""
        base = cls.float_type
        if type(module) is not base:
            raise TypeError(f"{cls.__name__}.convert expects a plain {base.__name__}, got {type(module).__name__}")
        module.__class__ = cls
        module._set_quantizers(weight_quantizer, act_quantizer)
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight go through fake-quantizers."""

    float_type = nn.Conv2d

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_quantizers(weight_quantizer, act_quantizer)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight = self._quantize_io(input)
        return self._conv_forward(input, weight, self.bias)


class QLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` whose input and weight go through fake-quantizers."""

    float_type = nn.Linear

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_quantizers(weight_quantizer, act_quantizer)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight = self._quantize_io(input)
        return F.linear(input, weight, self.bias)


#: float layer type -> its quantization-aware subclass
QUANT_LAYER_TYPES: dict[type[nn.Module], type[QuantLayer]] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


class PrequantizedWeight(nn.Module):
    """Stands in for a weight quantizer when the weight already lies on its grid (loaded exports).

    Forward is the identity; ``export`` recovers the integer codes from ``scale`` and ``offset``.
    """

    def __init__(self, bits: int, scale: torch.Tensor, offset: float):
        super().__init__()
        self.bits = bits
        self.offset = float(offset)
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def export(self, weight: torch.Tensor) -> QuantizedWeight:
        scale = self.scale.view(-1, *([1] * (weight.dim() - 1))) if self.scale.dim() == 1 else self.scale
        codes = torch.round(weight.detach().float() / scale - self.offset).clamp_(0, 2**self.bits - 1)
        return QuantizedWeight(codes.to(torch.uint8), self.scale.clone(), self.offset, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, offset={self.offset}"
