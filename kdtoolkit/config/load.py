"""TOML (or a dict) -> ``PipelineConfig``, reporting every problem at once with its key path.

cattrs does the structuring (``forbid_extra_keys`` catches typos, ``detailed_validation`` keeps every
error); component tables are dispatched on their ``name`` to the plugin's options class, so each
plugin's options are checked like the core's. The converter is built after the plugins have loaded.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Union

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from kdtoolkit.config.validators import FieldError
from kdtoolkit.config.schema import COMPONENT_KINDS, SCHEMA_VERSION, PipelineConfig
from kdtoolkit.errors import ConfigError, join_path
from kdtoolkit.plugins import Registry


class _UnknownKeys(Exception):
    def __init__(self, keys: Iterable[str], candidates: Iterable[str]):
        self.keys = sorted(keys)
        self.candidates = sorted(candidates)
        super().__init__(", ".join(self.keys))


class _Problem(Exception):
    """A problem whose message is already user-facing."""


def _note(exc: BaseException, name: str, type_=Any) -> BaseException:
    exc.__notes__ = [*getattr(exc, "__notes__", []), AttributeValidationNote(f"Structuring {name}", name, type_)]
    return exc


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _type_name(t) -> str:
    name = getattr(t, "__name__", None)
    if name and not getattr(t, "__args__", None):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(name, name)
    return str(t).replace("typing.", "")


def _message(exc: BaseException, type_) -> str:
    if isinstance(exc, KeyError):
        return "required key missing"
    text = str(exc)
    m = re.match(r"(.*) not in literal (.*)", text)
    if m:
        allowed = re.findall(r"'([^']*)'", m.group(2))
        return f"{m.group(1)!r} is not one of {', '.join(repr(a) for a in allowed)}"
    if isinstance(exc, cattrs.errors.StructureHandlerNotFoundError):
        return f"unsupported value ({text})"
    if type_ is not None and isinstance(exc, (TypeError, AttributeError)):
        return f"expected {_type_name(type_)}"
    return text


def _walk(exc: BaseException, path: str, out: list[tuple[str, str]]) -> None:
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, IterableValidationNote):
                index = note.index
                sub_path = f"{path}[{index}]" if isinstance(index, int) else join_path(path, _key(index))
                note_type = note.type
            else:
                sub_path = join_path(path, note.name)
                note_type = note.type
            if isinstance(sub, (ClassValidationError, IterableValidationError)):
                _walk(sub, sub_path, out)
            else:
                _leaf(sub, sub_path, note_type, out)
        for sub in without:
            _leaf(sub, path, None, out)
    else:
        _leaf(exc, path, None, out)


def _leaf(exc: BaseException, path: str, type_, out: list[tuple[str, str]]) -> None:
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        _walk(exc, path, out)
    elif isinstance(exc, _UnknownKeys):
        for key in exc.keys:
            out.append((join_path(path, key), "unknown key" + did_you_mean(key, exc.candidates)))
    elif isinstance(exc, ForbiddenExtraKeysError):
        fields = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            out.append((join_path(path, key), "unknown key" + did_you_mean(key, fields)))
    elif isinstance(exc, FieldError):
        out.append((join_path(path, exc.field), exc.message))
    elif isinstance(exc, ConfigError):
        for sub_path, msg in exc.problems:
            out.append((join_path(path, sub_path), msg))
    else:
        out.append((path, _message(exc, type_)))


def _key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


def structure_errors(exc: BaseException) -> ConfigError:
    found: list[tuple[str, str]] = []
    _walk(exc, "", found)
    problems: list[tuple[str, str]] = []
    for path, msg in found:
        # the same problem seen at a field and at its table (class-level validators): keep the field
        if (path, msg) in problems or any(p.startswith(path + ".") and m.endswith(msg) for p, m in found if p != path):
            continue
        problems.append((path, msg))
    return ConfigError(problems=problems)


def _strict_float(value, _type):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Problem(f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _Problem(f"expected a finite number, got {value!r}")
    return value


def _strict_int(value, _type):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"expected an integer, got {value!r}")
    return value


def _strict_str(value, _type):
    if not isinstance(value, str):
        raise _Problem(f"expected a string, got {value!r}")
    return value


def _strict_bool(value, _type):
    if not isinstance(value, bool):
        raise _Problem(f"expected true or false, got {value!r}")
    return value


def _is_list(t) -> bool:
    return getattr(t, "__origin__", None) is list


def _is_dict(t) -> bool:
    return getattr(t, "__origin__", None) is dict


def _list_hook(conv: cattrs.Converter, t):
    from cattrs.cols import list_structure_factory

    base = list_structure_factory(t, conv)

    def hook(value, _type):
        if not isinstance(value, (list, tuple)):
            raise _Problem(f"expected an array (a TOML list, or [[...]] tables), got {value!r}")
        return base(value, _type)

    return hook


def _dict_hook(conv: cattrs.Converter, t):
    from cattrs.gen import make_mapping_structure_fn

    base = make_mapping_structure_fn(t, conv)

    def hook(value, _type):
        if not isinstance(value, dict):
            raise _Problem(f"expected a table, got {value!r}")
        return base(value, _type)

    return hook


def _str_or_str_list(value, _type):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _Problem(f"expected a reference string or a non-empty list of them, got {value!r}")


def _all_errors_hook(conv: cattrs.Converter, cls: type):
    """cattrs' structuring of ``cls``, plus: when it fails, each field's attrs validator is run on
    its own, so a bad value is reported even when another field of the table is also wrong (attrs
    runs validators only once the whole class can be built)."""
    base = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)

    def hook(raw, _type):
        try:
            return base(raw, _type)
        except ClassValidationError as exc:
            if not isinstance(raw, dict):
                raise
            failed = {getattr(n, "name", None) for _, n in exc.group_exceptions()[0]}
            extra = []
            for f in attrs.fields(cls):
                if f.validator is None or f.name in failed or f.name not in raw:
                    continue
                try:
                    value = conv.structure(raw[f.name], f.type)
                    f.validator(None, f, value)
                except FieldError as err:
                    extra.append(_note(_Problem(err.message), f.name, f.type))
                except (ValueError, TypeError) as err:
                    extra.append(_note(_Problem(str(err)), f.name, f.type))
                except Exception:  # noqa: BLE001 - any other failure is already reported by cattrs
                    pass
            if not extra:
                raise
            raise ClassValidationError(exc.message, [*exc.exceptions, *extra], cls) from None

    return hook


def make_converter(registry: Registry) -> cattrs.Converter:
    """A converter for ``PipelineConfig`` that dispatches component tables on ``name``."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    # TOML has real types: no silent "3" -> 3 or 1 -> True coercions.
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Union[str, list[str]], _str_or_str_list)
    conv.register_structure_hook_factory(attrs.has, lambda cls: _all_errors_hook(conv, cls))
    conv.register_structure_hook_factory(_is_list, lambda t: _list_hook(conv, t))
    conv.register_structure_hook_factory(_is_dict, lambda t: _dict_hook(conv, t))
    for cls, kind in COMPONENT_KINDS.items():
        conv.register_structure_hook(cls, _component_hook(conv, cls, kind, registry))
        conv.register_unstructure_hook(cls, _component_unstructure(conv, cls))
    return conv


def _component_hook(conv: cattrs.Converter, cls: type, kind: str, registry: Registry):
    generic_fields = [f.name for f in attrs.fields(cls) if f.name != "options"]
    generic = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, options=override(omit=True))

    def hook(raw, _type):
        if not isinstance(raw, dict):
            raise _Problem(f"expected a table with a 'name' key, got {raw!r}")
        errors: list[BaseException] = []
        options = None
        name = raw.get("name")
        component = None
        if isinstance(name, str) and name in registry.names(kind):
            component = registry.get(kind, name)
        elif "name" in raw and isinstance(name, str):
            installed = registry.names(kind)
            errors.append(
                _note(
                    _Problem(
                        f"unknown {kind} {name!r}{did_you_mean(name, installed)}; "
                        f"installed: {', '.join(installed) or 'none'}"
                    ),
                    "name",
                )
            )
        plugin_keys = {k: v for k, v in raw.items() if k not in generic_fields}
        option_fields = [f.name for f in attrs.fields(component.options)] if component and component.options else []
        if component is not None:
            unknown = [k for k in plugin_keys if k not in option_fields]
            if unknown:
                errors.append(_UnknownKeys(unknown, generic_fields + option_fields))
            known = {k: v for k, v in plugin_keys.items() if k in option_fields}
            if component.options is not None:
                try:
                    options = conv.structure(known, component.options)
                except ClassValidationError as exc:
                    errors.extend(exc.exceptions)
                except FieldError as exc:
                    errors.append(exc)
                except (ValueError, TypeError) as exc:  # an attrs validator on the whole class
                    errors.append(_Problem(str(exc)))
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
            out.update({k: v for k, v in conv.unstructure(opts).items()})
        return out

    return hook


# --- entry points --------------------------------------------------------------------------------


#: tables and arrays nested deeper than this are refused (the reader and deep copies recurse)
MAX_DEPTH = 64
#: an override value that is not TOML is taken as a string only when it is one bare word like these
_BARE_WORD = re.compile(r"[A-Za-z0-9_./:+@~-]+")
_KEY_PART = re.compile(r"[A-Za-z0-9_-]+|\[\d+\]")


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a pipeline file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at line {line})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    deep = _too_deep(raw)
    if deep is not None:
        raise ConfigError(f"{path}: {deep or 'the file'} is nested more than {MAX_DEPTH} levels deep")
    return raw


def _too_deep(value: Any) -> str | None:
    """The key path of the first table or array nested deeper than ``MAX_DEPTH`` (iteratively)."""
    stack = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(node, dict):
            stack.extend((v, join_path(path, _key(k)), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
    return None


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` strings (``--set``); values are TOML (a bare word such as
    ``cifar100`` or ``runs/x`` counts as a string); anything else is an error."""
    deep = _too_deep(raw)
    if deep is not None:
        raise ConfigError(problems=[(deep, f"nested more than {MAX_DEPTH} levels deep")])
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(("--set", f"expected KEY.PATH=VALUE, got {item!r}"))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".") if key else []
        if not parts or not all(_KEY_PART.fullmatch(p) or re.fullmatch(r"[A-Za-z0-9_-]+(\[\d+\])+", p) for p in parts):
            problems.append(("--set", f"{item!r}: bad key path {key!r} (expected e.g. run.epochs or losses[0].weight)"))
            continue
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as exc:
            if not _BARE_WORD.fullmatch(text.strip()):
                problems.append((key, f"--set value {text!r} is not a TOML value ({exc}); quote strings: {key}='\"...\"'"))
                continue
            value = text.strip()
        except RecursionError:
            problems.append((key, "--set value nested too deeply"))
            continue
        if _too_deep(value) is not None:
            problems.append((key, f"--set value nested more than {MAX_DEPTH} levels deep"))
            continue
        try:
            _set_path(raw, key, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append((key, f"cannot set ({exc})"))
    if problems:
        raise ConfigError(problems=problems)
    return raw


def _set_path(raw: dict, key: str, value: Any) -> None:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", key)
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                raise IndexError(f"no list item {part}")
            if last:
                node[index] = value
            else:
                node = node[index]
        else:
            if not isinstance(node, dict):
                raise TypeError(f"{part!r} is not inside a table")
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})


def structure(raw: dict, registry: Registry) -> PipelineConfig:
    """Validate a raw pipeline dict; raises ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline must be a table")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ConfigError(
            problems=[("schema_version", f"{version} is newer than this kdtoolkit supports ({SCHEMA_VERSION}); upgrade kdtoolkit")]
        )
    conv = make_converter(registry)
    raw = dict(raw)
    raw.setdefault("method", {"name": "supervised"})  # so its options are structured like any other
    try:
        cfg = conv.structure(raw, PipelineConfig)
    except ClassValidationError as exc:
        raise structure_errors(exc) from None
    if cfg.schema_version < 1:
        raise ConfigError(problems=[("schema_version", f"must be {SCHEMA_VERSION}")])
    return cfg


def unstructure(cfg: PipelineConfig, registry: Registry) -> dict:
    """The plain dict (TOML/JSON-ready) form of a config; ``structure`` of it gives it back."""
    return make_converter(registry).unstructure(cfg)
