"""The first-party quantizers' arithmetic as ``torch.library`` custom ops (namespace ``kdtoolkit``).

One definition of the numbers, whatever runs them:

* **Quotient and level in float32** (float64 for float64 tensors): ``t = x/s`` is a float32 division
  of the float32 values of ``x`` and ``s`` (bf16 inputs are widened exactly), ``k = round(clamp(t))``
  rounds half to even, the output is the float32 product ``k·s`` stored in the input's dtype (one
  rounding to bf16 for bf16 inputs). HWGQ's constant ``Δ`` is its float32 value (float64 for float64).
* **LSQ's step gradient from the formula's own terms**: ``g·Σ dy·∂v̂/∂s`` with
  ``∂v̂/∂s = round(t) − t`` inside the range and ``−Q_N``/``Q_P`` outside, summed in float64. The
  native kernel forms each product exactly in float64; the ATen path in float32 (one rounding, at
  most ``2^-24`` relative per term). Either way the error is below ``2^-22·g·Σ|dy·∂v̂/∂s|`` for
  tensors up to ``2^29`` elements, plus the final rounding to the step's dtype: a bound that does not
  grow with the tensor's size (``tests/test_quant_reference.py``).

Ops: ``kdtoolkit::lsq_forward(x, step, q_n, q_p, grad_scale)``, ``kdtoolkit::lsq_backward(dy, x,
step, q_n, q_p, grad_scale) -> (dx, d_step)`` and ``kdtoolkit::hwgq_forward(x, step, lo, levels,
zero_nonpositive)``, each with a fake (meta) implementation and autograd registered, so they appear
by name in the profiler, trace under ``torch.compile`` without a graph break and pass
``torch.export``. Implementation: on the CPU the fused kernels of :mod:`kdtoolkit.quant.native`
where they apply (dense tensors, per-tensor steps, a C compiler), else (CUDA, per-channel steps,
strided tensors, no compiler) the ATen chains below, which compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdtoolkit.quant import native
from kdtoolkit.quant.functional import grad_in_range


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32 (the precision of quotients and levels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_step(step: Tensor, like: Tensor) -> Tensor:
    """A per-channel step of shape (C,) viewed to broadcast over ``like``'s dim 0."""
    return step.view(-1, *([1] * (like.dim() - 1))) if step.dim() == 1 else step


# ---------------------------------------------------------------- ATen implementations (any device)


def _quotient(x: Tensor, step: Tensor) -> Tensor:
    """``x/s`` in the compute dtype, a new tensor (true division by a tensor: never a reciprocal)."""
    c = compute_dtype(x.dtype)
    return torch.div(x.to(c), expand_step(step.to(c), x))


def lsq_forward_aten(x: Tensor, step: Tensor, q_n: int, q_p: int) -> Tensor:
    s = expand_step(step.to(compute_dtype(x.dtype)), x)
    return _quotient(x, step).clamp_(-q_n, q_p).round_().mul_(s).to(x.dtype)


def lsq_backward_aten(dy: Tensor, x: Tensor, step: Tensor, q_n: int, q_p: int, grad_scale: float) -> tuple[Tensor, Tensor]:
    t = _quotient(x, step)
    inside = (t >= -q_n) & (t <= q_p)
    dx = torch.where(inside, dy, 0).to(x.dtype)
    local = torch.where(inside, torch.round(t) - t, torch.clamp(t, -q_n, q_p))  # ∂v̂/∂s
    dims = list(range(x.dim())) if step.dim() == 0 else list(range(1, x.dim()))
    d_step = torch.sum(local.mul_(dy), dim=dims, dtype=torch.float64) * grad_scale
    return dx, d_step.to(step.dtype)


def hwgq_forward_aten(x: Tensor, step: float, lo: int, levels: int, zero_nonpositive: bool) -> Tensor:
    c = compute_dtype(x.dtype)
    delta = torch.full((), step, dtype=c, device=x.device)
    y = torch.div(x.to(c), delta).round_().clamp_(lo, levels).mul_(delta)
    if zero_nonpositive:
        y = torch.ops.aten.threshold_backward.grad_input(y, x.to(c), 0.0, grad_input=y)  # 0 where x <= 0
    return y.to(x.dtype)


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("kdtoolkit::lsq_forward", mutates_args=())
def lsq_forward(x: Tensor, step: Tensor, q_n: int, q_p: int, grad_scale: float) -> Tensor:
    """LSQ ``round(clamp(x/s, −Q_N, Q_P))·s``; ``grad_scale`` is used by the backward."""
    if native.supports(x, step):
        return native.lsq_forward(x, step, q_n, q_p)
    return lsq_forward_aten(x, step, q_n, q_p)


@lsq_forward.register_fake
def _(x, step, q_n, q_p, grad_scale):
    return torch.empty_like(x)


@torch.library.custom_op("kdtoolkit::lsq_backward", mutates_args=())
def lsq_backward(dy: Tensor, x: Tensor, step: Tensor, q_n: int, q_p: int, grad_scale: float) -> tuple[Tensor, Tensor]:
    """LSQ's ``(dx, d_step)``: straight-through inside the range, the step gradient scaled by ``grad_scale``."""
    if native.supports(x, step):
        return native.lsq_backward(x, dy, step, q_n, q_p, grad_scale)
    return lsq_backward_aten(dy, x, step, q_n, q_p, grad_scale)


@lsq_backward.register_fake
def _(dy, x, step, q_n, q_p, grad_scale):
    return torch.empty_like(x), torch.empty_like(step)


def _lsq_setup(ctx, inputs, output):
    x, step, q_n, q_p, grad_scale = inputs
    ctx.save_for_backward(x, step)
    ctx.q = (q_n, q_p, grad_scale)


def _lsq_grad(ctx, dy):
    x, step = ctx.saved_tensors
    dx, d_step = torch.ops.kdtoolkit.lsq_backward(dy, x, step, *ctx.q)
    return dx, d_step, None, None, None


lsq_forward.register_autograd(_lsq_grad, setup_context=_lsq_setup)


@torch.library.custom_op("kdtoolkit::hwgq_forward", mutates_args=())
def hwgq_forward(x: Tensor, step: float, lo: int, levels: int, zero_nonpositive: bool) -> Tensor:
    """HWGQ ``Δ·clamp(round(x/Δ), lo, levels)``, and 0 where ``x <= 0`` if ``zero_nonpositive``."""
    if native.supports(x):
        return native.hwgq_forward(x, step, lo, levels, zero_nonpositive)
    return hwgq_forward_aten(x, step, lo, levels, zero_nonpositive)


@hwgq_forward.register_fake
def _(x, step, lo, levels, zero_nonpositive):
    return torch.empty_like(x)


def _hwgq_setup(ctx, inputs, output):
    x, step, lo, levels, zero_nonpositive = inputs
    ctx.save_for_backward(x)
    ctx.clip = levels * step


def _hwgq_grad(ctx, dy):
    (x,) = ctx.saved_tensors  # clipped ReLU: dy where 0 < x <= levels·Δ, exact bounds, one fused pass
    return grad_in_range(dy, x, 0.0, ctx.clip, lo_inclusive=False, hi_inclusive=True), None, None, None, None


hwgq_forward.register_autograd(_hwgq_grad, setup_context=_hwgq_setup)
