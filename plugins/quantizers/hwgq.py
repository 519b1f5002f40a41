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

Speed: custom autograd functions with constant (Python number) arguments, so no host sync. On the
CPU the activation forward is one fused pass (:mod:`kdtoolkit.quant.native`, computing ``x/Δ`` in
float32 for bf16 inputs); elsewhere it is ``div`` (the one new tensor) then ``round_, clamp_, mul_``
and, for "caffe", ``threshold_backward`` (zero where ``x <= 0``) in place. The backward is one
fused kernel (``hardtanh_backward`` with the exact clip bounds). Under ``torch.compile`` the same function uses
plain ``where``/comparison math instead, which the compiler fuses (the in-place chain fuses badly).
Weights: the std stays a device tensor.
Under bf16 autocast the activation quantizer keeps bf16 (``compute_dtype="input"``: the native
kernel divides in float32; the ATen and compiled paths round ``x/Δ`` to 8 significant bits before
``round``) or upcasts to float32 (``"float32"``).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

import kdtoolkit
from kdtoolkit.api import (
    QuantizedWeight,
    bits_validator,
    compiler_math,
    grad_in_range,
    in_compute_dtype,
    native,
    tensor_in_range as in_range,
    zero_where_nonpositive,
)

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


class _HWGQActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step: float, levels: int, caffe: bool):
        ctx.save_for_backward(x)
        ctx.clip = levels * step
        ctx.compiled = compiler_math()
        if ctx.compiled:  # plain math: torch.compile fuses it into one loop
            k = torch.clamp(torch.round(x / step), 1 if caffe else 0, levels)
            return torch.where(x > 0, k * step, 0.0) if caffe else k * step
        if native.supports(x):  # one fused pass (kdtoolkit.quant.native)
            return native.hwgq_forward(x, step, 1 if caffe else 0, levels, caffe)
        # eager ATen: one new tensor, then in-place passes; y = step * clamp(round(x / step), 1 or 0, levels)
        y = torch.div(x, step).round_().clamp_(1 if caffe else 0, levels).mul_(step)
        if caffe:
            zero_where_nonpositive(y, x, inplace=True)  # 0 where x <= 0
        # (where(x > 0, Δ·k, 0) in one pass through elu_backward(alpha=0) measured slower: it computes exp)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if ctx.compiled:
            return torch.where(in_range(x, 0.0, ctx.clip, lo_inclusive=False), dy, 0.0), None, None, None
        return grad_in_range(dy, x, 0.0, ctx.clip, lo_inclusive=False, hi_inclusive=True), None, None, None


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
        y = _HWGQActFunction.apply(xc, self.step, self.levels, self.rounding == "caffe")
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
