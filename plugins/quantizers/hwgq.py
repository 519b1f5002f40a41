"""HWGQ: half-wave Gaussian quantization (Cai, He, Sun, Vasconcelos, "Deep Learning with Low
Precision by Half-wave Gaussian Quantization", CVPR 2017); the quantizer of CMT-KD.

Activations (the layer's input, a BN-normalised ReLU output): ``q(x) = 0`` for ``x <= 0``, else the
nearest of ``Δ, 2Δ, …, (2^b − 1)Δ`` (``act_rounding="caffe"``: every x > 0 gives at least Δ, as in
the original Caffe code) or ``Δ·clamp(round(x/Δ), 0, 2^b − 1)`` (``"round"``, the EdMIPS variant).
``Δ = A_STEP[b]`` is a constant. Backward: clipped ReLU, ``dx = dy·[0 < x <= (2^b − 1)Δ]``.

Weights: mid-rise uniform grid ``±Δ/2, ±3Δ/2, …, ±(2^(b−1) − ½)Δ`` with ``Δ = W_STEP[b]·std(W)``
(unbiased ``torch.std``, detached, per layer, computed on the device); 1 bit gives
``sign(W)·0.7979·std(W)`` (``binary_weights="std"``) or ``sign(W)·mean|W|`` per output filter
(``"mean_abs"``, the paper's binary alternative). ``sign(0) = +1``. Backward: identity
(straight-through).

Steps: MSE-optimal uniform steps for a unit Gaussian (the project's METHODS.md, "Quantizers").

Numbers and speed: the activation quantizer is the custom op ``kdtoolkit::hwgq_forward``
(:mod:`kdtoolkit.quant.ops`): ``x/Δ`` and the level in float32 whatever the input dtype (bf16 stays
bf16 only in memory); on the CPU one fused C pass, elsewhere ATen; its backward is one fused kernel
(``hardtanh_backward`` with the exact clip bounds). ``torch.compile``/``torch.export`` see one op.
Weights: the std stays a device tensor (no host sync). ``compute_dtype="float32"`` upcasts the
activation before the op and casts back (the same levels, more memory traffic).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

import kdtoolkit
from kdtoolkit.api import QuantizedWeight, bits_validator, in_compute_dtype, ops

#: MSE-optimal uniform step for N(0, 1) weights, by bit-width (symmetric, 2^b levels)
W_STEP = {1: 1.5958, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
#: MSE-optimal uniform step for the positive half of N(0, 1) (2^b − 1 positive levels)
A_STEP = {1: 0.7979, 2: 0.5388, 3: 0.3217, 4: 0.1842, 5: 0.1030, 6: 0.0566, 7: 0.0307, 8: 0.0165}


@attrs.frozen
class HWGQOptions:
    """Options of the ``hwgq`` quantizer."""

    weight_bits: int = attrs.field(default=2, validator=bits_validator)
    act_bits: int = attrs.field(default=2, validator=bits_validator)
    #: "caffe": every x > 0 maps to at least Δ | "round": Δ·clamp(round(x/Δ), 0, 2^b − 1)
    act_rounding: str = attrs.field(default="caffe", validator=attrs.validators.in_(("caffe", "round")))
    #: 1-bit weights: "std" (sign·0.7979·std(W)) | "mean_abs" (sign·mean|W| per output filter)
    binary_weights: str = attrs.field(default="std", validator=attrs.validators.in_(("std", "mean_abs")))
    #: "input": compute in the activation's dtype (bf16 under autocast) | "float32": upcast, cast back
    compute_dtype: str = attrs.field(default="input", validator=attrs.validators.in_(("input", "float32")))


class _STEWeightFunction(torch.autograd.Function):
    """Forward: a weight quantizer's value (computed without autograd). Backward: identity."""

    @staticmethod
    def forward(ctx, weight, quantize):
        return quantize(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class HWGQActQuantizer(nn.Module):
    """Half-wave Gaussian quantizer of a layer's input activation (no learned state)."""

    def __init__(self, bits: int, rounding: str = "caffe", compute_dtype: str = "input"):
        super().__init__()
        if bits not in A_STEP:
            raise ValueError(f"HWGQ activations support 1..8 bits, got {bits}")
        self.bits = bits
        self.rounding = rounding
        self.compute_dtype = compute_dtype
        self.step = A_STEP[bits]
        self.levels = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = in_compute_dtype(x, self.compute_dtype)
        caffe = self.rounding == "caffe"
        y = ops.hwgq_forward(xc, self.step, 1 if caffe else 0, self.levels, caffe)
        return y if xc is x else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step={self.step}, rounding={self.rounding!r}"


class HWGQWeightQuantizer(nn.Module):
    """Mid-rise uniform weight quantizer with ``Δ = W_STEP[bits]·std(W)``; straight-through backward."""

    def __init__(self, bits: int, binary: str = "std"):
        super().__init__()
        if bits not in W_STEP:
            raise ValueError(f"HWGQ weights support 1..8 bits, got {bits}")
        self.bits = bits
        self.binary = binary

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits == 1 and self.binary == "mean_abs":
            scale = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
            return torch.where(weight >= 0, scale, -scale)
        delta = weight.std() * W_STEP[self.bits]
        half = 2 ** (self.bits - 1)
        return torch.div(weight, delta).floor_().clamp_(-half, half - 1).add_(0.5).mul_(delta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _STEWeightFunction.apply(weight, self._quantize)

    @torch.no_grad()
    def export(self, weight: torch.Tensor) -> QuantizedWeight:
        weight = weight.detach()
        if self.bits == 1 and self.binary == "mean_abs":
            scale = weight.abs().mean(dim=tuple(range(1, weight.dim())))
            return QuantizedWeight((weight >= 0).to(torch.uint8), (2 * scale).float(), -0.5, 1)
        delta = weight.std() * W_STEP[self.bits]
        half = 2 ** (self.bits - 1)
        codes = torch.div(weight, delta).floor_().clamp_(-half, half - 1).add_(half)
        return QuantizedWeight(codes.to(torch.uint8), delta.float(), 0.5 - half, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", binary={self.binary!r}" if self.bits == 1 else "")


class HWGQQuantizer:
    """The ``hwgq`` quantizer: builds HWGQ weight and activation fake-quantizers."""

    name = "hwgq"

    def __init__(self, options: HWGQOptions | None = None):
        self.options = options if options is not None else HWGQOptions()

    def weight_quantizer(self, bits: int, module: nn.Module) -> nn.Module:
        return HWGQWeightQuantizer(bits, binary=self.options.binary_weights)

    def act_quantizer(self, bits: int, module: nn.Module) -> nn.Module:
        return HWGQActQuantizer(bits, rounding=self.options.act_rounding, compute_dtype=self.options.compute_dtype)


@kdtoolkit.hookimpl
def register_quantizers(register):
    register(
        "hwgq",
        HWGQQuantizer,
        options=HWGQOptions,
        description="Half-wave Gaussian quantization (Cai et al., CVPR 2017): fixed Gaussian-optimal steps",
    )
