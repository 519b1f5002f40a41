"""Turn a float model into a quantization-aware one, in place, and warm-start it from float weights.

``quantize_model`` converts every ``nn.Conv2d`` / ``nn.Linear`` into :class:`~kdtoolkit.quant.QConv2d`
/ :class:`~kdtoolkit.quant.QLinear` (same module paths, same parameter names; the quantizers are new
child modules ``weight_quantizer`` and ``act_quantizer``). Bit-widths per layer:

1. ``weight_bits`` / ``act_bits`` for every layer;
2. with ``keep_first_last`` (default), the first and the last conv/linear layer in module order stay
   full precision (32 bits for both);
3. ``overrides`` in order, later ones winning: each :class:`LayerOverride` whose fnmatch ``pattern``
   matches the module path sets its non-``None`` bit-widths (32 = full precision).

A layer with 32/32 is left untouched (still a plain ``nn.Conv2d``/``nn.Linear``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

import attrs
import cattrs
import torch
from torch import nn

from kdtoolkit.quant.base import FULL_PRECISION, check_bits
from kdtoolkit.quant.layers import QUANT_LAYER_TYPES, QuantLayer

#: attribute of the root module where ``quantize_model`` records what it did (read by the exporter)
QUANT_INFO_ATTR = "kdtoolkit_quantization"


def _optional_bits(instance, attribute, value) -> None:
    if value is not None:
        check_bits(value, attribute.name)


def _non_empty(instance, attribute, value) -> None:
    if value == "":
        raise ValueError(f"{attribute.name} must not be empty")


@attrs.frozen
class LayerOverride:
    """Bit-widths for the layers whose module path matches ``pattern`` (``fnmatch``; e.g. ``"fc"``,
    ``"block3.*"``, ``"*.shortcut"``). ``None`` keeps the value set so far; 32 = full precision."""

    pattern: str = attrs.field(validator=_non_empty)
    weight_bits: int | None = attrs.field(default=None, validator=_optional_bits)
    act_bits: int | None = attrs.field(default=None, validator=_optional_bits)


from kdtoolkit.features import unwrap as _unwrap  # noqa: E402 - the one wrapper-stripper


def float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``nn.Conv2d``/``nn.Linear`` (quantized or not), in module order."""
    return [(p, m) for p, m in _unwrap(model).named_modules() if isinstance(m, tuple(QUANT_LAYER_TYPES))]


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Path -> layer for every :class:`QConv2d`/:class:`QLinear` in ``model``."""
    return {p: m for p, m in _unwrap(model).named_modules() if isinstance(m, QuantLayer)}


def plan_bits(
    model: nn.Module,
    *,
    weight_bits: int,
    act_bits: int,
    keep_first_last: bool = True,
    overrides: Sequence[LayerOverride] = (),
) -> dict[str, tuple[int, int]]:
    """Path -> ``(weight_bits, act_bits)`` for every conv/linear layer, as ``quantize_model`` would set."""
    check_bits(weight_bits, "weight_bits")
    check_bits(act_bits, "act_bits")
    layers = float_layers(model)
    plan: dict[str, tuple[int, int]] = {}
    for index, (path, _) in enumerate(layers):
        bits = (weight_bits, act_bits)
        if keep_first_last and index in (0, len(layers) - 1):
            bits = (FULL_PRECISION, FULL_PRECISION)
        for override in overrides:
            if fnmatch.fnmatchcase(path, override.pattern):
                bits = (
                    bits[0] if override.weight_bits is None else override.weight_bits,
                    bits[1] if override.act_bits is None else override.act_bits,
                )
        plan[path] = bits
    unused = [o.pattern for o in overrides if not any(fnmatch.fnmatchcase(p, o.pattern) for p in plan)]
    if unused:
        raise ValueError(f"layer overrides match no conv/linear layer: {unused}; layers: {list(plan)}")
    return plan


def quantize_model(
    model: nn.Module,
    quantizer: Any,
    *,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    keep_first_last: bool = True,
    overrides: Sequence[LayerOverride] = (),
) -> list[str]:
    """Make ``model`` quantization-aware in place; return the paths of the quantized layers.

    ``quantizer`` is what a ``register_quantizers`` factory returned. ``weight_bits``/``act_bits``
    default to ``quantizer.options.weight_bits``/``act_bits``. See the module docstring for how
    the per-layer bit-widths are chosen. Only plain ``nn.Conv2d``/``nn.Linear`` layers can be
    converted: a subclass with its own forward must be kept full precision by an override.
    """
    model = _unwrap(model)
    if quantized_layers(model):
        raise ValueError("model is already quantized (it has QConv2d/QLinear layers)")
    options = getattr(quantizer, "options", None)
    if weight_bits is None or act_bits is None:
        if not (hasattr(options, "weight_bits") and hasattr(options, "act_bits")):
            raise TypeError("give weight_bits and act_bits, or a quantizer whose options have them")
        weight_bits = options.weight_bits if weight_bits is None else weight_bits
        act_bits = options.act_bits if act_bits is None else act_bits
    overrides = tuple(overrides)
    plan = plan_bits(model, weight_bits=weight_bits, act_bits=act_bits, keep_first_last=keep_first_last, overrides=overrides)
    modules = dict(model.named_modules())
    todo = [(path, bits) for path, bits in plan.items() if bits != (FULL_PRECISION, FULL_PRECISION)]
    for path, _ in todo:  # check everything before changing anything
        if type(modules[path]) not in QUANT_LAYER_TYPES:
            raise TypeError(
                f"layer {path!r} is a {type(modules[path]).__name__}, a subclass that cannot be converted; "
                f"keep it full precision with LayerOverride({path!r}, 32, 32)"
            )
    converted = []
    for path, (w_bits, a_bits) in todo:
        layer = modules[path]
        wq = None if w_bits == FULL_PRECISION else quantizer.weight_quantizer(w_bits, layer)
        aq = None if a_bits == FULL_PRECISION else quantizer.act_quantizer(a_bits, layer)
        # quantizers live where the layer lives, in its dtype
        ref = layer.weight
        for q in (wq, aq):
            if q is not None:
                q.to(device=ref.device, dtype=ref.dtype)
        QUANT_LAYER_TYPES[type(layer)].convert(layer, wq, aq)
        converted.append(path)
    setattr(
        model,
        QUANT_INFO_ATTR,
        {
            "quantizer": getattr(quantizer, "name", type(quantizer).__name__),
            "options": cattrs.Converter().unstructure(options) if attrs.has(type(options)) else None,
            "weight_bits": weight_bits,
            "act_bits": act_bits,
            "keep_first_last": keep_first_last,
            "overrides": [attrs.asdict(o) for o in overrides],
            "layers": {p: list(b) for p, b in plan.items()},
        },
    )
    return converted


def quantizer_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys that belong to quantizer modules (absent from a float state dict)."""
    prefixes = tuple(f"{p}." if p else "" for p in quantized_layers(model))
    keys = []
    for key in model.state_dict():
        for prefix in prefixes:
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest is not None and rest.startswith(("weight_quantizer.", "act_quantizer.")):
                keys.append(key)
                break
    return keys


def load_float_state_dict(qmodel: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a float model's ``state_dict`` into its quantized version; return the quantizer keys it lacked.

    Every key of ``qmodel`` must be present except quantizer state (``*.weight_quantizer.*``,
    ``*.act_quantizer.*``), and no key may be unexpected: otherwise ``KeyError`` naming them,
    before anything is loaded. Quantizers whose state was missing are then re-initialised from the
    loaded model: ``weight_quantizer.initialize(weight)`` (LSQ weight steps from the new weights)
    and ``act_quantizer.reset()`` (LSQ activation steps from the next batch). A state dict that
    does contain quantizer state (a quantized checkpoint) loads as is.
    """
    qmodel = _unwrap(qmodel)
    expected = set(qmodel.state_dict())
    quant_keys = set(quantizer_state_keys(qmodel))
    given = set(state_dict)
    missing = sorted(expected - given - quant_keys)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the quantized model: missing {missing}, unexpected {unexpected}")
    qmodel.load_state_dict(state_dict, strict=False)
    lacking = sorted(quant_keys - given)
    for path, layer in quantized_layers(qmodel).items():
        prefix = f"{path}." if path else ""
        for name in ("weight_quantizer", "act_quantizer"):
            q = getattr(layer, name)
            if q is None:
                continue
            q_keys = [k for k in quant_keys if k.startswith(f"{prefix}{name}.")]
            if not any(k in given for k in q_keys):  # (quantizers without state: always)
                if name == "weight_quantizer" and hasattr(q, "initialize"):
                    q.initialize(layer.weight)
                elif name == "act_quantizer" and hasattr(q, "reset"):
                    q.reset()
    return lacking
