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

**Numbers and speed.** The forward and backward are the custom ops ``kdtoolkit::lsq_forward`` /
``kdtoolkit::lsq_backward`` (:mod:`kdtoolkit.quant.ops`): ``x/s`` and the level in float32 whatever
the input dtype (bf16 stays bf16 only in memory), the step gradient summed from the formula's own
terms in float64. On the CPU they run fused C kernels (one pass each way), elsewhere ATen;
``torch.compile`` and ``torch.export`` see them as single ops. 1-bit weights are plain ATen.
``compute_dtype="float32"`` upcasts the input before the op and casts the output back (the same
levels, more memory traffic).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

import kdtoolkit
from kdtoolkit.api import QuantizedWeight, bits_validator, grad_in_range, in_compute_dtype, ops
from kdtoolkit.api import expand_step as _expand


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
            dims = list(range(x.dim())) if step.dim() == 0 else list(range(1, x.dim()))
            d_step = torch.sum(local.to(ops.compute_dtype(x.dtype)) * dy, dim=dims, dtype=torch.float64) * ctx.grad_scale
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
        return ops.lsq_forward(weight, self.step, self.q_n, self.q_p, self._grad_scale(weight))

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
        y = ops.lsq_forward(xc, self.step, self.q_n, self.q_p, grad_scale)
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
