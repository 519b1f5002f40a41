"""Building blocks for fast fake-quantizers (used by the HWGQ and LSQ plugins).

A fake-quantizer is bandwidth-bound: its cost is the number of passes over the activation tensor
and the number of fresh activation-sized tensors (on CPU, a fresh tensor's pages are faulted in on
first touch, which costs more than an in-place pass over it).
These helpers map the common backward pieces onto single fused ATen kernels, with constant
(Python number) arguments only, so that nothing reads a tensor value on the host:

* :func:`grad_in_range` — ``grad * [lo (<)<= x (<)<= hi]`` in one pass (``hardtanh_backward``), instead
  of comparison, ``&``, ``where`` on bool masks (which are several times slower on CPU).
* :func:`dot` — ``sum(a * b)`` accumulated in float32/float64 as a 0-dim tensor, in one pass without
  an activation-sized temporary.
* :func:`zero_where_nonpositive` — ``where(x <= 0, 0, y)`` in one pass (``threshold_backward``).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

_REDUCED = (torch.bfloat16, torch.float16)


def compiler_math() -> bool:
    """True while ``torch.compile`` traces: quantizers then use plain pointwise math (``where``,
    comparisons, ``sum``) that the compiler fuses into one loop, instead of the eager path's chains
    of in-place ATen kernels (which are the fastest eager code but fuse badly)."""
    return torch.compiler.is_compiling()


def in_range(x: torch.Tensor, lo: float, hi: float, *, lo_inclusive: bool = True, hi_inclusive: bool = True) -> torch.Tensor:
    """Boolean ``lo (<)<= x (<)<= hi`` with the exact bounds of :func:`grad_in_range` (any compute dtype)."""
    min_val = representable_bound(float(lo), x.dtype, "lt" if lo_inclusive else "le")
    max_val = representable_bound(float(hi), x.dtype, "gt" if hi_inclusive else "ge")
    return (x > min_val) & (x < max_val)


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _bits_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _round_bf16(value: float) -> float:
    bits = _f32_bits(value)  # float64 -> float32 (nearest), then float32 -> bfloat16 (nearest even)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return _bits_f32(bits)


def _next_bf16(value: float, up: bool) -> float:
    if value == 0.0:
        return _bits_f32(0x00010000) * (1.0 if up else -1.0)
    bits = _f32_bits(value) >> 16
    bits += 1 if (value > 0) == up else -1
    return _bits_f32(bits << 16)


def _nearest(value: float, dtype: torch.dtype) -> float:
    if dtype == torch.bfloat16:
        return _round_bf16(value)
    return float({torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}[dtype](value))


def _neighbour(value: float, dtype: torch.dtype, up: bool) -> float:
    if dtype == torch.bfloat16:
        return _next_bf16(value, up)
    np_type = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}[dtype]
    return float(np.nextafter(np_type(value), np_type(math.inf if up else -math.inf)))


_BOUNDS: dict[tuple[float, torch.dtype, str], float] = {}


@torch.compiler.assume_constant_result  # torch.compile: evaluated at trace time, a constant
def representable_bound(value: float, dtype: torch.dtype, side: str) -> float:
    """A number ``b`` of ``dtype`` next to ``value``, for exact comparisons in that dtype.

    ``side``: ``"le"`` the largest ``b <= value``; ``"lt"`` the largest ``b < value``; ``"ge"`` the
    smallest ``b >= value``; ``"gt"`` the smallest ``b > value``. Then for every ``x`` of ``dtype``,
    e.g. ``x < b`` (``"gt"``) is exactly ``x <= value``. Host arithmetic on Python numbers only.
    """
    key = (value, dtype, side)
    if key not in _BOUNDS:
        _BOUNDS[key] = _representable_bound(value, dtype, side)
    return _BOUNDS[key]


def _representable_bound(value: float, dtype: torch.dtype, side: str) -> float:
    near = _nearest(value, dtype)
    if side == "le":
        return near if near <= value else _neighbour(near, dtype, up=False)
    if side == "lt":
        return near if near < value else _neighbour(near, dtype, up=False)
    if side == "ge":
        return near if near >= value else _neighbour(near, dtype, up=True)
    if side == "gt":
        return near if near > value else _neighbour(near, dtype, up=True)
    raise ValueError(side)


def grad_in_range(
    grad: torch.Tensor,
    x: torch.Tensor,
    lo: float,
    hi: float,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad`` where ``lo <= x <= hi`` (``<`` for a non-inclusive end), else 0; one fused pass.

    ``lo``/``hi`` are Python numbers compared *exactly* (not rounded to ``x.dtype`` first, as
    ``x <= hi`` would do for a bfloat16 ``x``). ``grad`` and ``x`` must have the same dtype.
    ``out`` (which may be ``x`` itself, a temporary) receives the result instead of a new tensor.
    """
    # hardtanh_backward keeps grad where min_val < x < max_val (strictly)
    min_val = representable_bound(float(lo), x.dtype, "lt" if lo_inclusive else "le")
    max_val = representable_bound(float(hi), x.dtype, "gt" if hi_inclusive else "ge")
    if out is not None:
        return torch.ops.aten.hardtanh_backward.grad_input(grad, x, min_val, max_val, grad_input=out)
    return torch.ops.aten.hardtanh_backward(grad, x, min_val, max_val)


def zero_where_nonpositive(y: torch.Tensor, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``where(x <= 0, 0, y)`` in one pass; ``inplace`` writes into ``y``."""
    if inplace:
        return torch.ops.aten.threshold_backward.grad_input(y, x, 0.0, grad_input=y)
    return torch.ops.aten.threshold_backward(y, x, 0.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_views(a: torch.Tensor, b: torch.Tensor):
    """1-D views of ``a`` and ``b`` in the same memory order, or None if not possible without a copy."""
    if a.shape != b.shape or a.stride() != b.stride():
        return None
    if a.is_contiguous():
        return a.view(-1), b.view(-1)
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        return a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1)
    return None


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-channel (dim 1) ``sum(a * b)`` in one pass without a temporary, accumulated in float32.

    It is the weight gradient of batch norm with mean 0 and inverse std 1
    (``Σ dy·(x − mean)·invstd``): a fused, vectorised reduction for every dtype and memory format,
    whose products are formed in float32 (exact for bfloat16 inputs).
    """
    acc = accumulation_dtype(a.dtype)
    channels = a.shape[1]
    zeros = torch.zeros(channels, dtype=acc, device=a.device)
    ones = torch.ones(channels, dtype=acc, device=a.device)
    return torch.ops.aten.native_batch_norm_backward(
        a, b, None, None, None, zeros, ones, True, 0.0, [False, True, False]
    )[1]


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` as a 0-dim float32 (float64 for float64 inputs) tensor, on the device.

    One pass and no activation-sized temporary (on CPU a fresh temporary costs more than the
    arithmetic: its pages are faulted in): float32/float64 with a shared dense layout use
    ``torch.dot``; other tensors of 2+ dims (bfloat16 under autocast) a per-channel fused reduction
    (:func:`_channel_dot`); the rest multiply then sum.
    """
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        views = _flat_views(a, b)
        if views is not None:
            return torch.dot(*views)
    if a.dim() >= 2 and a.shape == b.shape and a.dtype == b.dtype:
        return _channel_dot(a, b).sum()
    return torch.mul(a, b).sum(dtype=accumulation_dtype(a.dtype))


def dot_per_channel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` over every dim but 0, shape ``(a.shape[0],)``, accumulated like :func:`dot`."""
    return torch.mul(a, b).sum(dim=tuple(range(1, a.dim())), dtype=accumulation_dtype(a.dtype))


def in_compute_dtype(x: torch.Tensor, compute_dtype: str) -> torch.Tensor:
    """``x`` as float32 when ``compute_dtype == "float32"`` and x is bfloat16/float16, else ``x``."""
    if compute_dtype == "float32" and x.dtype in _REDUCED:
        return x.float()
    if compute_dtype not in ("input", "float32"):
        raise ValueError(f"compute_dtype must be 'input' or 'float32', got {compute_dtype!r}")
    return x
