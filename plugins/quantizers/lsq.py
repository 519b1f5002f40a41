"""LSQ: learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step
Size Quantization", ICLR 2020).

``v̂ = round(clamp(v/s, −Q_N, Q_P))·s`` with a learned step ``s``. Weights are signed
(``Q_N = 2^(b−1)``, ``Q_P = 2^(b−1) − 1``); activations (ReLU outputs) unsigned (``Q_N = 0``,
``Q_P = 2^b − 1``; ``signed_acts=True`` makes them signed like weights).

Backward: straight-through for ``v`` inside the range ``−Q_N <= v/s <= Q_P`` (zero outside);
``∂v̂/∂s = round(v/s) − v/s`` inside, ``−Q_N`` / ``Q_P`` below / above; the step gradient is scaled by
``g = 1/sqrt(N·Q_P)``, ``N`` the number of elements the step quantizes (the whole tensor, batch
included; one output channel for ``per_channel`` weights).

Init: ``s = 2·mean|v|/sqrt(Q_P)``; weights at construction (and again by
``initialize(weight)``, which ``load_float_state_dict`` calls), activations on the first batch.

1-bit signed weights (``Q_P = 0``) are a sign quantizer with a learned scale: ``v̂ = s·sign(v)``
(``sign(0) = +1``), straight-through inside ``|v/s| <= 1``, ``∂v̂/∂s = sign(v) − v/s`` inside and
``sign(v)`` outside, ``g = 1/sqrt(N)``, init ``s = mean|v|`` (the least-squares binary scale).

**No host sync.** The activation init is done by the first forward without reading any tensor on
the host: a Python flag says "initialisation pending", and the pending forward writes
``step ← where(initialized, step, 2·mean|x|/sqrt(Q_P))`` and sets the ``initialized`` buffer, all
on the device. ``initialized`` is saved in the ``state_dict``; loading a state dict sets the flag
again so that a loaded step is kept (the ``where``) rather than overwritten. ``reset()`` forces a
re-init from the next batch, ``initialize(x)`` does it now from ``x``. (With DDP, initialise
before wrapping, or every rank keeps its own first-batch step.)

**Speed.** On the CPU, per-tensor steps run the fused kernels of :mod:`kdtoolkit.quant.native`:
the forward is one pass, the backward one pass giving the input gradient and the step gradient
together (float block sums, then float64). Elsewhere (CUDA, per-channel steps, non-dense tensors, no C
compiler) the ATen chain: forward ``div, clamp_, round_, mul_`` (one new tensor, the output);
backward ``t = x/s`` into a temporary, the in-range gradient written over it in one fused kernel
(``hardtanh_backward``), and the step gradient from two fused reductions without temporaries,
``∂L/∂s = g·(⟨dy, v̂⟩ − ⟨dx, v⟩)/s``, which equals ``g·Σ dy·∂v̂/∂s`` because ``dx = dy·inside`` and
``v̂ = round(c)·s`` (no mask tensor is ever built). Under ``torch.compile`` the function uses the
formula as written (``where`` on a mask, one ``sum``), which the compiler fuses into one or two
loops; the eager chain above fuses badly (measured).

**Precision.** ``compute_dtype="input"`` keeps the activation's dtype (bf16 under autocast).
The native kernel computes ``x/s`` and the gradients in float32 and rounds only the output to bf16
(8 significant bits: from about 6-bit activations the levels ``k·s`` are rounded, error up to
``k·s·2^-9``). The ATen and compiled paths compute in bf16, so ``x/s`` is rounded before ``round``
too (inputs near a threshold may move to the next level), and the rounded levels enter ``∂L/∂s``.
``compute_dtype="float32"`` upcasts the input and computes everything in float32, then casts the
output back (slower).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

import kdtoolkit
from kdtoolkit.api import (
    QuantizedWeight,
    accumulation_dtype,
    bits_validator,
    compiler_math,
    dot,
    dot_per_channel,
    grad_in_range,
    in_compute_dtype,
    native,
)


@attrs.frozen
class LSQOptions:
    """Options of the ``lsq`` quantizer."""

    weight_bits: int = attrs.field(default=2, validator=bits_validator)
    act_bits: int = attrs.field(default=2, validator=bits_validator)
    #: one learned weight step per output channel instead of per layer
    per_channel: bool = False
    #: quantize activations on a signed grid (for inputs that are not ReLU outputs)
    signed_acts: bool = False
    #: "input": compute in the activation's dtype (bf16 under autocast) | "float32": upcast, cast back
    compute_dtype: str = attrs.field(default="input", validator=attrs.validators.in_(("input", "float32")))


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)`` for ``bits`` on a signed or unsigned grid."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _expand(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel step of shape (C,) viewed to broadcast over ``like``'s dim 0."""
    return step.view(-1, *([1] * (like.dim() - 1))) if step.dim() == 1 else step


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, q_n: int, q_p: int, grad_scale: float):
        s = _expand(step, x)
        ctx.q = (q_n, q_p, grad_scale)
        ctx.compiled = compiler_math()
        if ctx.compiled:  # plain math: torch.compile fuses it
            ctx.save_for_backward(x, step)
            return torch.round(torch.clamp(x / s, -q_n, q_p)) * s
        ctx.native = native.supports(x, step)  # per-tensor steps only (a 1-dim step is refused)
        if ctx.native:  # one fused pass (kdtoolkit.quant.native)
            ctx.save_for_backward(x, step)
            return native.lsq_forward(x, step, q_n, q_p)
        y = torch.div(x, s).clamp_(-q_n, q_p).round_().mul_(s)
        # x is kept alive by the ReLU before us and y by the layer after: saving them costs no memory
        # (saving t = x/s too would, and measured no faster than recomputing it)
        ctx.save_for_backward(x, step, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        q_n, q_p, grad_scale = ctx.q
        if ctx.compiled:
            return _lsq_backward_plain(ctx, dy)
        if ctx.native:
            x, step = ctx.saved_tensors
            dx, d_step = native.lsq_backward(
                x, dy, step, q_n, q_p, grad_scale,
                need_input_grad=ctx.needs_input_grad[0], need_step_grad=ctx.needs_input_grad[1],
            )
            return dx, d_step, None, None, None
        x, step, y = ctx.saved_tensors
        t = torch.div(x, _expand(step, x))
        dx = grad_in_range(dy, t, -q_n, q_p, out=t)  # t is a temporary: dx takes its memory
        d_step = None
        if ctx.needs_input_grad[1]:
            # Σ dy·∂v̂/∂s = Σ dy·(round(c) − t·inside) = (⟨dy, v̂⟩ − ⟨dx, v⟩)/s, as dy·inside = dx:
            # two fused reductions, no mask and no temporary
            if step.dim() == 0:
                num = dot(dy, y) - dot(dx, x)
            else:
                num = dot_per_channel(dy, y) - dot_per_channel(dx, x)
            d_step = (num / step * grad_scale).to(step.dtype)
        return (dx if ctx.needs_input_grad[0] else None), d_step, None, None, None


def _lsq_backward_plain(ctx, dy):
    """The backward as the formula reads (what ``torch.compile`` fuses best)."""
    x, step = ctx.saved_tensors
    q_n, q_p, grad_scale = ctx.q
    t = x / _expand(step, x)
    inside = (t >= -q_n) & (t <= q_p)
    dx = torch.where(inside, dy, 0.0)
    local = torch.where(inside, torch.round(t) - t, torch.clamp(t, -q_n, q_p))
    acc = accumulation_dtype(x.dtype)
    dims = tuple(range(x.dim())) if step.dim() == 0 else tuple(range(1, x.dim()))
    d_step = ((dy.to(acc) * local.to(acc)).sum(dim=dims) * grad_scale).to(step.dtype)
    return dx, d_step, None, None, None


class _LSQBinaryFunction(torch.autograd.Function):
    """1-bit signed: ``s·sign(v)`` with a learned ``s`` (LSQ's rule with ``round`` -> ``sign``)."""

    @staticmethod
    def forward(ctx, x, step, grad_scale: float):
        s = _expand(step, x)
        ctx.save_for_backward(x, step)
        ctx.grad_scale = grad_scale
        return torch.where(x >= 0, s, -s)

    @staticmethod
    def backward(ctx, dy):
        x, step = ctx.saved_tensors
        s = _expand(step, x)
        t = torch.div(x, s)
        dx = grad_in_range(dy, t, -1, 1)
        d_step = None
        if ctx.needs_input_grad[1]:
            sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
            local = sign - grad_in_range(t, t, -1, 1)  # sign(v) − (v/s)·inside
            if step.dim() == 0:
                d_step = dot(dy, local) * ctx.grad_scale
            else:
                d_step = dot_per_channel(dy, local) * ctx.grad_scale
            d_step = d_step.to(step.dtype)
        return (dx if ctx.needs_input_grad[0] else None), d_step, None


class LSQWeightQuantizer(nn.Module):
    """LSQ weight fake-quantizer: signed grid, learned ``step`` (per layer or per output channel)."""

    def __init__(self, bits: int, weight: torch.Tensor, per_channel: bool = False):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"LSQ supports 1..8 bits, got {bits}")
        self.bits = bits
        self.per_channel = per_channel
        self.q_n, self.q_p = qrange(bits, signed=True)
        shape = (weight.shape[0],) if per_channel else ()
        self.step = nn.Parameter(torch.ones(shape, dtype=weight.dtype, device=weight.device))
        self.initialize(weight)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """``step = 2·mean|W|/sqrt(Q_P)`` (``mean|W|`` for 1 bit), per layer or per output channel."""
        w = weight.detach()
        mean_abs = w.abs().mean(dim=tuple(range(1, w.dim()))) if self.per_channel else w.abs().mean()
        init = mean_abs if self.bits == 1 else 2 * mean_abs / math.sqrt(self.q_p)
        self.step.copy_(init.clamp_min(torch.finfo(init.dtype).tiny))

    def _grad_scale(self, weight: torch.Tensor) -> float:
        n = weight.numel() // (weight.shape[0] if self.per_channel else 1)
        return 1.0 / math.sqrt(n * max(self.q_p, 1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            return _LSQBinaryFunction.apply(weight, self.step, self._grad_scale(weight))
        return _LSQFunction.apply(weight, self.step, self.q_n, self.q_p, self._grad_scale(weight))

    @torch.no_grad()
    def export(self, weight: torch.Tensor) -> QuantizedWeight:
        weight = weight.detach()
        step = self.step.detach()
        s = _expand(step, weight)
        if self.bits == 1:
            return QuantizedWeight((weight >= 0).to(torch.uint8), (2 * step).float(), -0.5, 1)
        codes = torch.div(weight, s).clamp_(-self.q_n, self.q_p).round_().add_(self.q_n)
        return QuantizedWeight(codes.to(torch.uint8), step.float().clone(), float(-self.q_n), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class LSQActQuantizer(nn.Module):
    """LSQ activation fake-quantizer with a learned ``step``, initialised from the first batch."""

    def __init__(self, bits: int, signed: bool = False, compute_dtype: str = "input"):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"LSQ supports 1..8 bits, got {bits}")
        self.bits = bits
        self.signed = signed
        self.compute_dtype = compute_dtype
        self.q_n, self.q_p = qrange(bits, signed=signed)
        if self.q_p == 0:
            raise ValueError("1-bit signed activations are not supported (Q_P = 0)")
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._init_pending = True  # host-side: run the (sync-free) initialisation on the next forward

    @torch.no_grad()
    def _init_value(self, x: torch.Tensor) -> torch.Tensor:
        mean_abs = x.detach().abs().mean(dtype=torch.float32)
        return (2 * mean_abs / math.sqrt(self.q_p)).clamp_min_(1e-8).to(self.step.dtype)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``step = 2·mean|x|/sqrt(Q_P)`` from ``x`` now."""
        self.step.copy_(self._init_value(x))
        self.initialized.fill_(True)
        self._init_pending = False

    def reset(self) -> None:
        """Re-initialise the step from the next batch."""
        self.initialized.fill_(False)
        self._init_pending = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_pending = True  # keep a loaded step if its 'initialized' says so (decided on device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._init_pending:
            with torch.no_grad():
                self.step.copy_(torch.where(self.initialized, self.step, self._init_value(x)))
                self.initialized.fill_(True)
            self._init_pending = False
        xc = in_compute_dtype(x, self.compute_dtype)
        grad_scale = 1.0 / math.sqrt(xc.numel() * self.q_p)
        y = _LSQFunction.apply(xc, self.step, self.q_n, self.q_p, grad_scale)
        return y if xc is x else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class LSQQuantizer:
    """The ``lsq`` quantizer: builds LSQ weight and activation fake-quantizers."""

    name = "lsq"

    def __init__(self, options: LSQOptions | None = None):
        self.options = options if options is not None else LSQOptions()

    def weight_quantizer(self, bits: int, module: nn.Module) -> nn.Module:
        return LSQWeightQuantizer(bits, module.weight, per_channel=self.options.per_channel)

    def act_quantizer(self, bits: int, module: nn.Module) -> nn.Module:
        return LSQActQuantizer(bits, signed=self.options.signed_acts, compute_dtype=self.options.compute_dtype)


@kdtoolkit.hookimpl
def register_quantizers(register):
    register(
        "lsq",
        LSQQuantizer,
        options=LSQOptions,
        description="Learned step size quantization (Esser et al., ICLR 2020): learned per-layer steps",
    )
