"""Quantization-aware training: quantized layers, model conversion, low-bit export.

* :func:`quantize_model` converts a float model in place (module paths and parameter names do not
  change); :func:`load_float_state_dict` warm-starts it from a float checkpoint.
* Quantizers come from plugins (``register_quantizers``; first-party: ``hwgq``, ``lsq``); the
  protocol they implement is :class:`Quantizer` (see :mod:`kdtoolkit.quant.base`).
* :func:`export_quantized` / :func:`load_exported` write and read bit-packed safetensors files.
* :mod:`kdtoolkit.quant.native` and :mod:`kdtoolkit.quant.functional` hold the building blocks of
  fast fake-quantizers.

How the first-party quantizers are made fast (a fake-quantizer costs memory traffic, not
arithmetic): each is a custom ``torch.autograd.Function`` with three implementations of the same
formulas, chosen per call without reading any tensor value on the host:

* on the CPU, :mod:`kdtoolkit.quant.native`: fused C kernels (LSQ forward, LSQ backward with the
  step gradient, HWGQ activation forward), one OpenMP pass each, compiled on first use;
* elsewhere (CUDA, float16, non-dense tensors, no C compiler) chains of fused ATen kernels: one
  new tensor plus in-place passes, ``hardtanh_backward`` with exact constant bounds for the
  straight-through mask, fused reductions for LSQ's step gradient (:mod:`kdtoolkit.quant.functional`);
* under ``torch.compile`` the plain formula (``where``/comparisons/``sum``), which the compiler
  fuses with the neighbouring BN/ReLU.

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
