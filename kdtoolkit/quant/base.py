"""What a quantizer plugin provides, and the exported form of a quantized weight.

A quantizer plugin registers a factory ``factory(options) -> Quantizer``. The :class:`Quantizer`
builds one fake-quantizer module per quantized layer: ``weight_quantizer(bits, layer)`` for the
layer's weight and ``act_quantizer(bits, layer)`` for the layer's *input* activation. These modules
become children ``weight_quantizer`` / ``act_quantizer`` of the layer (see
:mod:`kdtoolkit.quant.layers`), so their learned state (e.g. LSQ steps) is in the model's
``state_dict``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

#: Bit-width meaning "leave this tensor in full precision".
FULL_PRECISION = 32
#: Bit-widths a quantizer must support (plus :data:`FULL_PRECISION`).
QUANT_BITS = range(1, 9)


def check_bits(bits: int, what: str = "bits") -> int:
    """``bits`` if it is 1..8 or 32 (full precision), else ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or (bits not in QUANT_BITS and bits != FULL_PRECISION):
        raise ValueError(f"{what} must be 1..8 or {FULL_PRECISION} (full precision), got {bits!r}")
    return bits


def bits_validator(instance, attribute, value) -> None:
    """attrs validator for ``weight_bits`` / ``act_bits`` option fields."""
    check_bits(value, attribute.name)


@attrs.frozen
class QuantizedWeight:
    """A quantized weight as integers: ``weight = scale * (codes + offset)``.

    ``codes``: ``uint8`` tensor of the weight's shape with values in ``[0, 2**bits)``.
    ``scale``: float32 tensor, shape ``()`` (per tensor) or ``(out_channels,)`` (per output channel,
    broadcast along dim 0). ``offset``: a float constant (e.g. ``-2**(bits-1)`` for a signed
    LSQ grid, ``-2**(bits-1) + 0.5`` for a mid-rise grid). :meth:`dequantize` reproduces the
    fake-quantized weight bit for bit.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: float
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.to(dtype)
        if scale.dim() == 1:
            scale = scale.view(-1, *([1] * (self.codes.dim() - 1)))
        return (self.codes.to(dtype) + self.offset) * scale


@runtime_checkable
class WeightQuantizer(Protocol):
    """A weight fake-quantizer module: ``q(weight)`` has the weight's shape and dtype.

    ``export(weight)`` gives the integer form of ``q(weight)``. Optional: ``initialize(weight)``
    re-derives data-dependent state (LSQ steps) from a (newly loaded) weight.
    """

    bits: int

    def __call__(self, weight: torch.Tensor) -> torch.Tensor: ...

    def export(self, weight: torch.Tensor) -> QuantizedWeight: ...


@runtime_checkable
class ActQuantizer(Protocol):
    """An activation fake-quantizer module applied to a layer's input: ``q(x)`` has x's shape/dtype.

    Optional: ``reset()`` forgets data-dependent state so that it is re-initialised from the next batch.
    """

    bits: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Quantizer(Protocol):
    """What a ``register_quantizers`` factory returns.

    ``name`` is the registered name and ``options`` the options object it was built from: both are
    written to exported files so that :func:`kdtoolkit.quant.load_exported` can rebuild it.
    """

    name: str
    options: Any

    def weight_quantizer(self, bits: int, module: nn.Module) -> nn.Module: ...

    def act_quantizer(self, bits: int, module: nn.Module) -> nn.Module: ...
