"""Low-bit export of a quantization-aware model to safetensors, and loading it back.

File layout (``safetensors``, never pickle):

* ``q:<layer>.weight:codes`` — the layer's weight codes (unsigned, ``bits`` each), bit-packed into a
  ``uint8`` stream (:func:`pack_bits`: code ``i`` occupies stream bits ``[i·b, (i+1)·b)``, least
  significant bit first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``), codes in the
  row-major order of the weight's logical shape;
* ``q:<layer>.weight:scale`` — float32 scale, shape ``()`` or ``(out_channels,)``; the weight is
  ``scale·(code + offset)``, ``offset`` and ``bits`` and the shape being in the metadata;
* every other ``state_dict`` entry under its own name, unquantized (first/last layers, BN, biases,
  activation-quantizer state such as LSQ steps);
* string metadata: ``format`` (``"kdtoolkit.quantized"``), ``format_version``, ``architecture``
  (JSON of what the caller passed), ``quantization`` (JSON: quantizer name and options, default
  bit-widths, first/last rule, overrides, bits per layer) and ``weights`` (JSON: per quantized weight
  its bits, shape, offset).

``load_exported`` rebuilds a module from the file: ``build_model(architecture)`` gives the float
model, which is quantized the same way; the quantized weights are unpacked into the layers, whose
weight quantizers become :class:`~kdtoolkit.quant.layers.PrequantizedWeight` (identity: the weight is
already on its grid), and the remaining tensors are loaded. Its logits equal the fake-quantized
model's.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import cattrs
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kdtoolkit.quant.base import QuantizedWeight
from kdtoolkit.quant.layers import PrequantizedWeight
from kdtoolkit.quant.model import QUANT_INFO_ATTR, LayerOverride, _unwrap, quantize_model, quantized_layers

FORMAT = "kdtoolkit.quantized"
FORMAT_VERSION = 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (< 2**bits) into a ``uint8`` tensor of ``ceil(n·bits/8)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if flat.size and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = np.unpackbits(flat[:, None], axis=1, count=bits, bitorder="little")  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as a 1-D ``uint8`` tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    data = packed.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if data.size != (count * bits + 7) // 8:
        raise ValueError(f"{data.size} bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(data.copy())
    stream = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy(np.packbits(stream, axis=1, bitorder="little").reshape(count))


def _codes_key(name: str) -> str:
    return f"q:{name}:codes"


def _scale_key(name: str) -> str:
    return f"q:{name}:scale"


def export_quantized(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, int | float]:
    """Write ``model`` (made by :func:`~kdtoolkit.quant.quantize_model`) as a low-bit safetensors file.

    ``metadata`` describes the architecture (whatever ``build_model`` of :func:`load_exported` needs;
    JSON-serialisable). Returns sizes in bytes: ``file``, ``quantized_weights`` (packed codes and
    scales), ``quantized_weights_float32`` (the same weights as float32), ``other`` (the float
    tensors) and ``quantized_ratio`` (packed / float32).
    """
    model = _unwrap(model)
    info = getattr(model, QUANT_INFO_ATTR, None)
    if info is None:
        raise ValueError("model was not made by kdtoolkit.quant.quantize_model: nothing records how it was quantized")
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    weights_meta: dict[str, dict[str, Any]] = {}
    quantized_bytes = float32_bytes = 0
    for layer_path, layer in quantized_layers(model).items():
        prefix = f"{layer_path}." if layer_path else ""
        for key in [k for k in state if k.startswith(f"{prefix}weight_quantizer.")]:
            del state[key]  # represented by the codes' scale
        if layer.weight_quantizer is None:
            continue
        name = f"{prefix}weight"
        q: QuantizedWeight = layer.weight_quantizer.export(layer.weight.detach())
        packed = pack_bits(q.codes, q.bits)
        scale = q.scale.detach().to(torch.float32).cpu().contiguous()
        tensors[_codes_key(name)] = packed
        tensors[_scale_key(name)] = scale
        weights_meta[name] = {"bits": q.bits, "shape": list(layer.weight.shape), "offset": q.offset}
        del state[name]
        quantized_bytes += packed.numel() + scale.numel() * 4
        float32_bytes += layer.weight.numel() * 4
    other_bytes = 0
    for key, value in state.items():
        tensors[key] = value.detach().cpu().contiguous()
        other_bytes += value.numel() * value.element_size()
    file_metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": json.dumps(metadata, sort_keys=True),
        "quantization": json.dumps(info, sort_keys=True),
        "weights": json.dumps(weights_meta, sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=file_metadata)
    return {
        "file": os.path.getsize(path),
        "quantized_weights": quantized_bytes,
        "quantized_weights_float32": float32_bytes,
        "other": other_bytes,
        "quantized_ratio": quantized_bytes / float32_bytes if float32_bytes else 0.0,
    }


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an exported file: ``architecture``, ``quantization``, ``weights``."""
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={raw.get('format')!r})")
    if int(raw.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {raw['format_version']} is newer than this kdtoolkit ({FORMAT_VERSION})")
    return {key: json.loads(raw[key]) for key in ("architecture", "quantization", "weights")}


def _make_quantizer(info: dict[str, Any], registry) -> Any:
    if registry is None:
        from kdtoolkit.plugins import load_registry

        registry = load_registry()
    component = registry.get("quantizer", info["quantizer"])
    if component.options is None or info["options"] is None:
        return component.factory(None)
    return component.factory(cattrs.Converter().structure(info["options"], component.options))


def load_exported(
    path: str | os.PathLike,
    build_model: Callable[[dict[str, Any]], nn.Module],
    *,
    quantizer: Any = None,
    registry=None,
) -> nn.Module:
    """Rebuild a module from a file written by :func:`export_quantized`; returned in eval mode.

    ``build_model(architecture_metadata)`` must return the float architecture. The quantizer is
    rebuilt by name from ``registry`` (default: the installed plugins) unless ``quantizer`` is given.
    """
    meta = read_export_metadata(path)
    info = meta["quantization"]
    model = build_model(meta["architecture"])
    if quantizer is None:
        quantizer = _make_quantizer(info, registry)
    quantize_model(
        model,
        quantizer,
        weight_bits=info["weight_bits"],
        act_bits=info["act_bits"],
        keep_first_last=info["keep_first_last"],
        overrides=[LayerOverride(**o) for o in info["overrides"]],
    )
    plan = getattr(model, QUANT_INFO_ATTR)["layers"]
    if plan != info["layers"]:
        raise ValueError(f"{path}: the rebuilt model's layers/bits differ from the file's: {plan} != {info['layers']}")
    layers = quantized_layers(model)
    with safe_open(os.fspath(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.no_grad():
        for name, wmeta in meta["weights"].items():
            layer_path = name[: -len(".weight")] if name != "weight" else ""
            layer = layers[layer_path]
            shape = tuple(wmeta["shape"])
            if tuple(layer.weight.shape) != shape:
                raise ValueError(f"{path}: {name} has shape {shape} in the file, {tuple(layer.weight.shape)} in the model")
            count = int(np.prod(shape))
            codes = unpack_bits(tensors.pop(_codes_key(name)), wmeta["bits"], count).view(shape)
            scale = tensors.pop(_scale_key(name))
            q = QuantizedWeight(codes, scale, float(wmeta["offset"]), int(wmeta["bits"]))
            layer.weight.copy_(q.dequantize(layer.weight.dtype).to(layer.weight.device))
            layer.weight_quantizer = PrequantizedWeight(q.bits, scale, q.offset).to(layer.weight.device)
    expected = set(model.state_dict())
    quantized_names = set(meta["weights"])
    prequant_keys = {k for k in expected if any(k.startswith(f"{n[: -len('weight')]}weight_quantizer.") for n in quantized_names)}
    missing = sorted(expected - set(tensors) - quantized_names - prequant_keys)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors, strict=False)
    return model.eval()
