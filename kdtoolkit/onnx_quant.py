"""How kdtoolkit's quantizers are written as ONNX nodes, exactly.

Weights (any quantizer with ``export(weight) -> QuantizedWeight``: ``w = scale·(code + offset)``):

* integer offset ``−2^(b−1)`` (LSQ's signed grid): the signed codes ``code + offset`` are stored as
  ``INT2`` / ``INT4`` / ``INT8`` (the smallest ONNX type that holds ``b`` bits) and
  ``w = DequantizeLinear(codes, scale)`` (``axis=0`` for a per-channel scale). One float32 rounding,
  the same as the fake-quantizer's ``round(·)·s``.
* any other offset (HWGQ's mid-rise grid ``±Δ/2, ±3Δ/2, …``: offset ``½ − 2^(b−1)``; 1-bit weights:
  ``−½``): the unsigned codes are stored as ``UINT2`` / ``UINT4`` / ``UINT8`` and
  ``w = Mul(Add(DequantizeLinear(codes, 1), offset), scale)``. ``code + offset`` is exact in float32
  (small half-integers), so again one rounding, the fake-quantizer's.

Activations (the layer's input), ``QuantizeLinear``/``DequantizeLinear`` pairs:

* LSQ, ``v̂ = round(clamp(v/s, −Q_N, Q_P))·s``: ``QuantizeLinear`` saturates to its type's range,
  so the type and zero point carry ``[−Q_N, Q_P]``: unsigned 2-bit is ``UINT2`` with zero point 0
  (codes ``[0, 3]``), signed 2-bit is ``UINT2`` with zero point 2 (``round(x/s) + 2`` in ``[0, 3]``,
  i.e. ``round(x/s)`` in ``[−2, 1]``); likewise ``UINT4`` and ``UINT8``. A signed grid gets a
  ``Max(x, −Q_N·s)`` in front (a no-op: saturation does the same): onnxruntime 1.31's
  Relu/QuantizeLinear fusion (default optimisations) deletes a ``Relu`` that feeds a 2-bit
  ``QuantizeLinear`` even when the zero point is not the type's minimum (``INT2`` with zero point 0
  or ``UINT2`` with 2), which changes the result (measured: logits off by 0.5 on a small W2A2 net);
  with the ``Max`` between them the ``Relu`` stays. Bit-widths without an ONNX type of
  exactly that range (1-bit HWGQ, 3, 5, 6, 7) use the next wider type after a ``Clip`` to
  ``[−Q_N·s, Q_P·s]``.
* HWGQ ``"round"``, ``Δ·clamp(round(x/Δ), 0, 2^b − 1)``: unsigned type of ``b`` bits, scale ``Δ``.
* HWGQ ``"caffe"`` (every ``x > 0`` maps to at least ``Δ``, ``x <= 0`` to 0): the input first goes
  through ``Where(x > 0, Max(x, Δ), 0)``; then ``QuantizeLinear`` as for ``"round"``. ``Max(x, Δ)``
  lifts ``0 < x < Δ·½`` (which would round to code 0) to code 1 and leaves ``x >= Δ`` unchanged.

``QuantizeLinear`` rounds half to even, like ``torch.round``. Both compute ``x/s`` in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdtoolkit.errors import KDToolkitError


class OnnxExportError(KDToolkitError):
    """A model or quantizer that the ONNX exporter cannot write."""


def onnx_type(bits: int, signed: bool) -> int:
    """The ONNX tensor type that holds ``bits``-bit codes (``INT2``/``UINT2`` for 1-2 bits, ...)."""
    from onnx import TensorProto as T

    if bits <= 2:
        return T.INT2 if signed else T.UINT2
    if bits <= 4:
        return T.INT4 if signed else T.UINT4
    if bits <= 8:
        return T.INT8 if signed else T.UINT8
    raise OnnxExportError(f"{bits}-bit codes have no ONNX integer type")


def type_range(onnx_dtype: int) -> tuple[int, int]:
    from onnx import TensorProto as T

    return {T.INT2: (-2, 1), T.UINT2: (0, 3), T.INT4: (-8, 7), T.UINT4: (0, 15), T.INT8: (-128, 127), T.UINT8: (0, 255)}[onnx_dtype]


def int_tensor(name: str, values: np.ndarray, onnx_dtype: int):
    """An initializer of a (possibly sub-byte) integer type; onnx packs INT2/INT4 itself."""
    import ml_dtypes
    from onnx import TensorProto as T
    from onnx import numpy_helper

    values = np.asarray(values, dtype=np.int64)
    lo, hi = type_range(onnx_dtype)
    if values.size and (values.min() < lo or values.max() > hi):
        raise OnnxExportError(f"{name}: codes {values.min()}..{values.max()} do not fit the ONNX type's range {lo}..{hi}")
    np_type = {T.INT2: ml_dtypes.int2, T.UINT2: ml_dtypes.uint2, T.INT4: ml_dtypes.int4, T.UINT4: ml_dtypes.uint4,
               T.INT8: np.int8, T.UINT8: np.uint8}[onnx_dtype]
    tensor = numpy_helper.from_array(values.astype(np_type), name)  # INT2/INT4 packed by onnx
    if tensor.data_type != onnx_dtype:
        raise OnnxExportError(f"{name}: onnx wrote type {tensor.data_type} for {onnx_dtype}")
    return tensor


def act_encoding(quantizer: Any, where: str) -> dict[str, Any]:
    """``{"scale", "q_min", "q_max", "bits", "signed", "positive_floor"}`` of an activation quantizer.

    A quantizer plugin may provide ``onnx_encoding()`` returning that dict; HWGQ and LSQ are
    recognised by their attributes. Anything else is refused.
    """
    if hasattr(quantizer, "onnx_encoding"):
        return dict(quantizer.onnx_encoding())
    name = type(quantizer).__name__
    if hasattr(quantizer, "levels") and hasattr(quantizer, "rounding") and isinstance(getattr(quantizer, "step", None), float):
        return {"scale": float(quantizer.step), "q_min": 0, "q_max": int(quantizer.levels), "bits": quantizer.bits,
                "signed": False, "positive_floor": quantizer.rounding == "caffe"}
    if hasattr(quantizer, "q_n") and hasattr(quantizer, "q_p") and isinstance(getattr(quantizer, "step", None), torch.Tensor):
        if getattr(quantizer, "_init_pending", False) and not bool(getattr(quantizer, "initialized", torch.tensor(True))):
            raise OnnxExportError(f"{where}: LSQ activation step was never initialised (the model has not seen a batch)")
        step = quantizer.step.detach()
        if step.numel() != 1:
            raise OnnxExportError(f"{where}: per-channel activation steps are not supported by the ONNX exporter")
        return {"scale": float(step.float()), "q_min": -int(quantizer.q_n), "q_max": int(quantizer.q_p),
                "bits": quantizer.bits, "signed": quantizer.q_n > 0, "positive_floor": False}
    raise OnnxExportError(f"{where}: activation quantizer {name} has no ONNX encoding (give it an onnx_encoding() method)")


def emit_act_quant(g, x: str, quantizer: Any, where: str) -> str:
    """Append the nodes that fake-quantize activation ``x``; return the output name."""
    enc = act_encoding(quantizer, where)
    dtype = onnx_type(enc["bits"], signed=False)  # unsigned only: see the module docstring
    zero_point = -enc["q_min"] if enc["signed"] else 0
    lo, hi = (v - zero_point for v in type_range(dtype))  # the range of round(x/s) it represents
    scale = np.float32(enc["scale"])
    if not scale > 0:
        raise OnnxExportError(f"{where}: activation step must be positive, got {enc['scale']}")
    s = g.const(f"{where}.act_scale", np.array(scale, np.float32))
    zp = g.add_initializer(int_tensor(g.unique(f"{where}.act_zero_point"), np.array(zero_point), dtype))
    if enc["positive_floor"]:  # HWGQ caffe: x > 0 -> at least Δ; x <= 0 -> 0
        zero = g.const(f"{where}.zero", np.array(0.0, np.float32))
        positive = g.node("Greater", [x, zero], f"{where}.act_positive")
        lifted = g.node("Max", [x, s], f"{where}.act_lifted")
        x = g.node("Where", [positive, lifted, zero], f"{where}.act_floor")
    if (enc["q_min"], enc["q_max"]) != (lo, hi):  # no ONNX type of exactly this range: clip first
        if not lo <= enc["q_min"] <= enc["q_max"] <= hi:
            raise OnnxExportError(f"{where}: code range {enc['q_min']}..{enc['q_max']} does not fit {lo}..{hi}")
        c_lo = g.const(f"{where}.act_clip_min", np.array(np.float32(enc["q_min"]) * scale, np.float32))
        c_hi = g.const(f"{where}.act_clip_max", np.array(np.float32(enc["q_max"]) * scale, np.float32))
        x = g.node("Clip", [x, c_lo, c_hi], f"{where}.act_clip")
    if zero_point != 0:  # keeps onnxruntime from deleting a Relu in front (module docstring)
        floor = g.const(f"{where}.act_min", np.array(np.float32(enc["q_min"]) * scale, np.float32))
        x = g.node("Max", [x, floor], f"{where}.act_min")
    q = g.node("QuantizeLinear", [x, s, zp], f"{where}.act_q")
    return g.node("DequantizeLinear", [q, s, zp], f"{where}.act_dq")


def emit_weight(g, layer: Any, where: str) -> tuple[str, dict[str, int]]:
    """Initializers and nodes giving the layer's fake-quantized weight; returns ``(name, sizes)``."""
    q = layer.weight_quantizer.export(layer.weight.detach())
    codes = q.codes.to(torch.int64).cpu().numpy()
    scale = q.scale.detach().to(torch.float32).cpu().numpy()
    bits = int(q.bits)
    per_channel = scale.ndim == 1
    axis = {"axis": 0} if per_channel else {}
    offset = float(q.offset)
    if offset == -(2 ** (bits - 1)) and bits >= 2:  # signed grid: DequantizeLinear(codes, scale)
        dtype = onnx_type(bits, signed=True)
        w = g.add_initializer(int_tensor(g.unique(f"{where}.weight_codes"), codes + int(offset), dtype))
        s = g.const(f"{where}.weight_scale", scale)
        out = g.node("DequantizeLinear", [w, s], f"{where}.weight", **axis)
    else:  # (codes + offset) · scale with a non-integer offset
        dtype = onnx_type(bits, signed=False)
        w = g.add_initializer(int_tensor(g.unique(f"{where}.weight_codes"), codes, dtype))
        one = g.const(f"{where}.one", np.array(1.0, np.float32))
        ints = g.node("DequantizeLinear", [w, one], f"{where}.weight_int")
        shifted = g.node("Add", [ints, g.const(f"{where}.weight_offset", np.array(offset, np.float32))], f"{where}.weight_shifted")
        if per_channel:
            scale = scale.reshape(-1, *([1] * (codes.ndim - 1)))
        out = g.node("Mul", [shifted, g.const(f"{where}.weight_scale", scale)], f"{where}.weight")
    packed = (codes.size * max(bits, 2 if bits <= 2 else 4 if bits <= 4 else 8) + 7) // 8
    return out, {"quantized_weight_bytes": packed + scale.size * 4, "float32_weight_bytes": codes.size * 4}
