"""The plugin API: everything a kdtoolkit plugin may import, in one module.

A plugin imports ``kdtoolkit`` (for ``kdtoolkit.hookimpl``) and ``kdtoolkit.api``, nothing else of
kdtoolkit; every other module is internal and may change between releases. The hooks themselves
are specified in ``kdtoolkit.hookspecs`` (one ``register_<kind>s(register)`` per kind).

Contracts (what a factory returns)
    ``Method``, ``LossTermsMethod``, ``MethodContext``, ``Progress`` (methods); ``Loss`` (losses);
    ``Schedule`` (schedules); ``Quantizer``, ``WeightQuantizer``, ``ActQuantizer``,
    ``QuantizedWeight`` (quantizers); ``StagedModel`` (models that run stage by stage);
    ``DatasetSplits``, ``TensorSplit`` (datasets).

Options and their validation
    A component's options are a frozen ``attrs`` class, structured from its TOML table with strict
    types. Validators: attrs' own (``attrs.validators.in_``, ...) and these, whose messages name the
    key (``models.student.depth: must be > 0, got 0``): ``check(predicate, message)``, ``positive``,
    ``non_negative``, ``in_range(low, high)``, ``one_of(values)``; raise ``FieldError(key, message)``
    from ``__attrs_post_init__`` for checks across keys. ``component(kind)`` declares an option that
    holds a nested component table (``peer = { name = "tiny_cnn", width = 12 }`` -> a ``ModelConfig``).
    Option names must differ from the generic keys of their table (``weight``, ``role``, ``root``, ...).

Errors
    ``ConfigError(problems=[(key_path, message)])`` for bad input (printed one line each, exit 2),
    ``FieldError`` inside validators, ``PluginError`` for a plugin that cannot work.

Features and configs
    ``resolve_module(model, "block2.0.conv1")``, ``FeatureTaps`` (forward hooks by module path);
    ``LossConfig``, ``ModelConfig`` (to build default loss terms, or read a nested component),
    ``PipelineConfig`` (what ``Method.check`` receives).

Quantizer support (provisional: moving into the quantizer plugin package)
    ``ops`` (the quantizers' custom ops: ``torch.ops.kdtoolkit.*``), ``expand_step``, ``native``,
    ``bits_validator`` and the helpers of ``kdtoolkit.quant.functional`` listed in ``_QUANT_HELPERS``.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdtoolkit.config.converter import component
from kdtoolkit.config.schema import FusionConfig, LossConfig, ModelConfig, PipelineConfig, ScheduleConfig
from kdtoolkit.config.validators import FieldError, check, in_range, non_negative, one_of, positive
from kdtoolkit.errors import ConfigError, DataError, KDToolkitError, PluginError
from kdtoolkit.data.safe_pickle import load as load_dataset_pickle  # dataset pickles, never code

#: public name -> the internal module that defines it (imported on first use: torch is heavy)
_LAZY: dict[str, str] = {
    "Method": "kdtoolkit.methods",
    "LossTermsMethod": "kdtoolkit.methods",
    "MethodContext": "kdtoolkit.methods",
    "Progress": "kdtoolkit.methods",
    "Loss": "kdtoolkit.losses",
    "call_loss": "kdtoolkit.losses",
    "Schedule": "kdtoolkit.schedules",
    "Quantizer": "kdtoolkit.quant.base",
    "WeightQuantizer": "kdtoolkit.quant.base",
    "ActQuantizer": "kdtoolkit.quant.base",
    "QuantizedWeight": "kdtoolkit.quant.base",
    "bits_validator": "kdtoolkit.quant.base",
    "StagedModel": "kdtoolkit.models",
    "DatasetSplits": "kdtoolkit.data.types",
    "TensorSplit": "kdtoolkit.data.types",
    "resolve_module": "kdtoolkit.features",
    "FeatureTaps": "kdtoolkit.features",
}

#: quantizer helpers of kdtoolkit.quant.functional (provisional)
_QUANT_HELPERS = ("grad_in_range", "in_compute_dtype")
_LAZY.update({name: "kdtoolkit.quant.functional" for name in _QUANT_HELPERS})
_LAZY["expand_step"] = "kdtoolkit.quant.ops"
#: modules published whole: the quantizer custom ops and the native kernel loader
_RENAMED = {"ops": ("kdtoolkit.quant.ops", None), "native": ("kdtoolkit.quant.native", None)}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        module = importlib.import_module(module)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'kdtoolkit.api' has no attribute {name!r}")


__all__ = sorted([
    "ConfigError", "DataError", "load_dataset_pickle", "FieldError", "FusionConfig", "KDToolkitError", "LossConfig", "ModelConfig",
    "PipelineConfig", "PluginError", "ScheduleConfig", "check", "component", "in_range", "non_negative", "one_of",
    "positive", *_LAZY, *_RENAMED,
])


def __dir__() -> list[str]:
    return __all__
