"""Building blocks for fake-quantizers (used by :mod:`kdtoolkit.quant.ops` and the quantizer plugins).

* :func:`grad_in_range` — ``grad * [lo (<)<= x (<)<= hi]`` in one fused pass (``hardtanh_backward``)
  with Python-number bounds compared *exactly* in ``x``'s dtype (:func:`representable_bound`), so
  nothing reads a tensor value on the host.
* :func:`in_compute_dtype` — the ``compute_dtype`` option of the quantizer plugins.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

_REDUCED = (torch.bfloat16, torch.float16)


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


def in_compute_dtype(x: torch.Tensor, compute_dtype: str) -> torch.Tensor:
    """``x`` as float32 when ``compute_dtype == "float32"`` and x is bfloat16/float16, else ``x``."""
    if compute_dtype == "float32" and x.dtype in _REDUCED:
        return x.float()
    if compute_dtype not in ("input", "float32"):
        raise ValueError(f"compute_dtype must be 'input' or 'float32', got {compute_dtype!r}")
    return x
