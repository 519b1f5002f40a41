"""Quantization-aware training: quantized layers, model conversion, low-bit export.

* :func:`quantize_model` converts a float model in place (module paths and parameter names do not
  change); :func:`load_float_state_dict` warm-starts it from a float checkpoint.
* Quantizers come from plugins (``register_quantizers``; first-party: ``hwgq``, ``lsq``); the
  protocol they implement is :class:`Quantizer` (see :mod:`kdtoolkit.quant.base`).
* :func:`export_quantized` / :func:`load_exported` write and read bit-packed safetensors files.
* :mod:`kdtoolkit.quant.ops` holds the first-party quantizers' arithmetic as ``torch.library``
  custom ops (one definition of the numbers; visible to the profiler, ``torch.compile`` and
  ``torch.export``); behind them, on the CPU, the fused C kernels of :mod:`kdtoolkit.quant.native`
  where they apply, else ATen (CUDA, per-channel steps, strided tensors, no compiler).

No host syncs: steps and ``std(W)`` stay on the device; LSQ's first-batch initialisation is a
``where`` on the device.
"""

from __future__ import annotations

from kdtoolkit.quant.base import (
    FULL_PRECISION,
    ActQuantizer,
    QuantizedWeight,
    Quantizer,
    WeightQuantizer,
    check_bits,
)
from kdtoolkit.quant.export import export_quantized, load_exported, pack_bits, read_export_metadata, unpack_bits
from kdtoolkit.quant.layers import PrequantizedWeight, QConv2d, QLinear, QuantLayer
from kdtoolkit.quant.model import (
    LayerOverride,
    load_float_state_dict,
    plan_bits,
    quantize_model,
    quantized_layers,
    quantizer_state_keys,
)

__all__ = [
    "FULL_PRECISION",
    "ActQuantizer",
    "LayerOverride",
    "PrequantizedWeight",
    "QConv2d",
    "QLinear",
    "QuantLayer",
    "QuantizedWeight",
    "Quantizer",
    "WeightQuantizer",
    "check_bits",
    "export_quantized",
    "load_exported",
    "load_float_state_dict",
    "pack_bits",
    "plan_bits",
    "quantize_model",
    "quantized_layers",
    "quantizer_state_keys",
    "read_export_metadata",
    "unpack_bits",
]
