"""The cattrs converter for pipelines, built after the plugins have loaded.

* Strict scalar hooks: TOML has real types, so no silent ``"3" -> 3`` or ``1 -> True``.
* Every attrs class is structured by cattrs' generated hook (``forbid_extra_keys``, detailed
  validation), with each validated field's validator run as soon as that field is structured, so
  a bad value is reported even when another field of the same table is also wrong.
* Component tables (``COMPONENT_KINDS``) are dispatched on their ``name`` to the plugin's options
  class; the plugin's option keys sit inline next to the table's generic keys.
* An options field declared with ``kdtoolkit.api.component(kind)`` holds a nested component table,
  structured the same way (a model becomes a full ``ModelConfig``).

Errors are cattrs' own exception groups; ``kdtoolkit.config.problems`` renders them.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn, override

from kdtoolkit.config.problems import Problem, UnknownKeys, did_you_mean, type_name
from kdtoolkit.config.validators import FieldError
from kdtoolkit.config.schema import COMPONENT_KINDS, KIND_CONFIGS, generic_keys
from kdtoolkit.plugins import Registry

#: attrs field metadata key of an options field that holds a nested component table
COMPONENT_METADATA = "kdtoolkit.component"


def component(kind: str, *, default: Any = attrs.NOTHING, description: str = ""):
    """An options field holding a nested component table of ``kind`` (``"model"``, ``"loss"``, ...).

    ``peer: ModelConfig = component("model")`` accepts ``peer = { name = "tiny_cnn", width = 12 }``
    and gives the method a ``ModelConfig`` whose ``options`` are that model's options, validated with
    the registry: unknown names, misspelt keys (``method.peer.widht``) and bad values are reported
    with every other problem of the pipeline, before anything is built. ``default=None`` makes it
    optional. In Python, pass the config object itself (``ModelConfig(name="tiny_cnn", options=...)``).
    """
    if kind not in KIND_CONFIGS:
        raise ValueError(f"component kind must be one of {', '.join(KIND_CONFIGS)}, got {kind!r}")
    return attrs.field(default=default, metadata={COMPONENT_METADATA: kind, "description": description})


# --- scalar and container hooks -------------------------------------------------------------------


def _strict_float(value, _type=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Problem(f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise Problem(f"expected a finite number, got {value!r}")
    return value


def _strict_int(value, _type=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem(f"expected an integer, got {value!r}")
    return value


def _strict_str(value, _type=None):
    if not isinstance(value, str):
        raise Problem(f"expected a string, got {value!r}")
    return value


def _strict_bool(value, _type=None):
    if not isinstance(value, bool):
        raise Problem(f"expected true or false, got {value!r}")
    return value


def _str_or_str_list(value, _type=None):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise Problem(f"expected a reference string or a non-empty list of them, got {value!r}")


def _literal_hook(t):
    allowed = get_args(t)

    def hook(value, _type=None):
        if value not in allowed or isinstance(value, bool) and not any(a is value for a in allowed):
            raise Problem(f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value

    return hook


def _list_hook(conv: cattrs.Converter, t):
    from cattrs.cols import list_structure_factory

    base = list_structure_factory(t, conv)

    def hook(value, _type=None):
        if not isinstance(value, (list, tuple)):
            raise Problem(f"expected an array (a TOML list, or [[...]] tables), got {value!r}")
        return base(value, t)

    return hook


def _tuple_hook(conv: cattrs.Converter, t):
    args = get_args(t)
    if not args or Ellipsis in args:
        from cattrs.cols import homogenous_tuple_structure_factory

        return homogenous_tuple_structure_factory(t, conv)

    def hook(value, _type=None):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise Problem(f"expected {type_name(t)}, got {value!r}")
        return tuple(conv.structure(v, a) for v, a in zip(value, args))

    return hook


def _dict_hook(conv: cattrs.Converter, t):
    base = make_mapping_structure_fn(t, conv)

    def hook(value, _type=None):
        if not isinstance(value, dict):
            raise Problem(f"expected a table, got {value!r}")
        return base(value, t)

    return hook


# --- attrs classes: fields validated one by one -------------------------------------------------


class _NeedsInstance(Exception):
    pass


class _NoInstance:
    """Passed to a field validator run before its instance exists; a validator that reads the
    instance is left to the class's own construction."""

    def __getattr__(self, name):
        raise _NeedsInstance(name)


def _validated_field(conv: cattrs.Converter, field: attrs.Attribute):
    def hook(value, _type=None):
        if field.type is not None and field.type is not Any:
            value = conv.structure(value, field.type)
        try:
            field.validator(_NoInstance(), field, value)
        except _NeedsInstance:
            pass
        except FieldError as exc:  # cattrs notes this field's name: keep only the message
            raise Problem(exc.message) if exc.field == field.name else exc from None
        except (ValueError, TypeError) as exc:
            args = exc.args  # attrs' own validators: (message, attribute, ...)
            plain = len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], attrs.Attribute)
            raise Problem(args[0] if plain else str(exc)) from None
        return value

    return hook


def _component_field(conv: cattrs.Converter, field: attrs.Attribute):
    cls = KIND_CONFIGS[field.metadata[COMPONENT_METADATA]]

    def hook(value, _type=None):
        if isinstance(value, cls):  # built in Python
            value = conv.unstructure(value)
        return conv.structure(value, cls)

    return hook


def _attrs_hook(conv: cattrs.Converter, cls: type, **extra):
    try:
        attrs.resolve_types(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: cattrs reports them per field
        pass
    overrides = dict(extra)
    for f in attrs.fields(cls):
        if f.name in overrides:
            continue
        if COMPONENT_METADATA in f.metadata:
            overrides[f.name] = override(struct_hook=_component_field(conv, f))
        elif f.validator is not None:
            overrides[f.name] = override(struct_hook=_validated_field(conv, f))
    return make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **overrides)


# --- component tables -----------------------------------------------------------------------------


def _component_hook(conv: cattrs.Converter, cls: type, kind: str, registry: Registry):
    generic_fields = generic_keys(cls)
    generic = _attrs_hook(conv, cls, options=override(omit=True))

    def hook(raw, _type=None):
        if isinstance(raw, cls):  # a component config built in Python (e.g. a nested option)
            raw = conv.unstructure(raw)
        if not isinstance(raw, dict):
            raise Problem(f"expected a table with a 'name' key, got {raw!r}")
        errors: list[BaseException] = []
        name, comp = raw.get("name"), None
        if isinstance(name, str):
            if (kind, name) in registry:
                comp = registry.get(kind, name)
            else:
                installed = registry.names(kind)
                problem = Problem(f"unknown {kind} {name!r}{did_you_mean(name, installed)}; installed: {', '.join(installed) or 'none'}")
                problem.__notes__ = [cattrs.AttributeValidationNote(f"Structuring {cls.__name__} @ name", "name", str)]
                errors.append(problem)
        option_fields = [f.name for f in attrs.fields(comp.options)] if comp and comp.options else []
        options = None
        if comp is not None:
            unknown = [k for k in raw if k not in generic_fields and k not in option_fields]
            if unknown:
                errors.append(UnknownKeys(unknown, generic_fields + option_fields))
            if comp.options is not None:
                try:
                    options = conv.structure({k: v for k, v in raw.items() if k in option_fields}, comp.options)
                except ClassValidationError as exc:
                    errors.extend(exc.exceptions)
        try:
            base = generic({k: v for k, v in raw.items() if k in generic_fields}, cls)
        except ClassValidationError as exc:
            errors.extend(exc.exceptions)
            base = None
        if errors:
            raise ClassValidationError(f"While structuring {cls.__name__}", errors, cls)
        return attrs.evolve(base, options=options)

    return hook


def _component_unstructure(conv: cattrs.Converter, cls: type):
    def hook(value):
        out = {}
        for f in attrs.fields(cls):
            if f.name == "options":
                continue
            v = getattr(value, f.name)
            if v is None or (isinstance(v, (list, dict)) and not v and f.name != "inputs"):
                continue
            out[f.name] = conv.unstructure(v)
        opts = value.options
        if isinstance(opts, dict):
            out.update(opts)
        elif opts is not None:
            out.update(conv.unstructure(opts))
        return out

    return hook


def _is(origin):
    return lambda t: get_origin(t) is origin


def make_converter(registry: Registry) -> cattrs.Converter:
    """A converter for ``PipelineConfig`` (and every options class) that knows ``registry``."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Union[str, list[str]], _str_or_str_list)
    conv.register_structure_hook_factory(_is(Literal), _literal_hook)
    conv.register_structure_hook_factory(attrs.has, lambda cls: _attrs_hook(conv, cls))
    conv.register_structure_hook_factory(_is(list), lambda t: _list_hook(conv, t))
    conv.register_structure_hook_factory(_is(dict), lambda t: _dict_hook(conv, t))
    conv.register_structure_hook_factory(_is(tuple), lambda t: _tuple_hook(conv, t))
    for cls, kind in COMPONENT_KINDS.items():
        conv.register_structure_hook(cls, _component_hook(conv, cls, kind, registry))
        conv.register_unstructure_hook(cls, _component_unstructure(conv, cls))
    return conv


__all__ = ["COMPONENT_METADATA", "component", "make_converter"]
