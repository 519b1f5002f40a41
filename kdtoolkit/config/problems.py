"""cattrs structuring errors -> ``ConfigError`` with TOML key paths, through ``cattrs.transform_error``.

cattrs walks its own exception groups and builds each problem's path (``.field``, ``[0]``,
``['key']``); our formatter only turns the leaf exception into messages. It never reads cattrs'
English text: it looks at exception types and attributes (attrs validators put the ``Attribute``
in ``args[1]``, ``FieldError`` carries its field, ``UnknownKeys`` its keys and candidates).
"""

from __future__ import annotations

import ast
import difflib
import re
from typing import Any, Iterable, Literal, Union, get_args, get_origin

import attrs
from cattrs.errors import ForbiddenExtraKeysError, StructureHandlerNotFoundError
from cattrs.v import transform_error

from kdtoolkit.config.validators import FieldError
from kdtoolkit.errors import ConfigError, join_path


class Problem(ValueError):
    """A problem whose message is already user-facing (raised by our structuring hooks)."""


class UnknownKeys(ValueError):
    """Keys of a table that no field (generic or plugin option) takes."""

    def __init__(self, keys: Iterable[str], candidates: Iterable[str]):
        self.keys = sorted(keys)
        self.candidates = sorted(candidates)
        super().__init__(", ".join(self.keys))


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def type_name(t) -> str:
    """How a field's type reads in a message: ``an integer``, ``a list of a string``, ..."""
    simple = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if t in simple:
        return simple[t]
    origin, args = get_origin(t), get_args(t)
    if origin is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return type_name(rest[0]) if len(rest) == 1 else " or ".join(type_name(a) for a in rest)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and Ellipsis not in args:
            return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
        plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}
        return f"a list of {plural.get(args[0]) or type_name(args[0])}"
    if origin is dict:
        return "a table"
    if attrs.has(t):
        return "a table"
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _messages(exc: BaseException, type_) -> list[tuple[str, str]]:
    """(key relative to the exception's path, message) for one leaf exception."""
    if isinstance(exc, FieldError):
        return [(exc.field, exc.message)]
    if isinstance(exc, UnknownKeys):
        return [(key, "unknown key" + did_you_mean(key, exc.candidates)) for key in exc.keys]
    if isinstance(exc, ForbiddenExtraKeysError):
        fields = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        return [(key, "unknown key" + did_you_mean(key, fields)) for key in sorted(exc.extra_fields)]
    if isinstance(exc, ConfigError):
        return list(exc.problems)
    if isinstance(exc, Problem):
        return [("", str(exc))]
    if isinstance(exc, KeyError):
        return [("", "required key missing")]
    if isinstance(exc, StructureHandlerNotFoundError):
        return [("", f"unsupported value for {type_name(exc.type)}")]
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], attrs.Attribute):
        # attrs' own validators (in_, instance_of, ...): (message, attribute, expected, value)
        return [(args[1].name, args[0])]
    if type_ is not None:  # cattrs could not make a value of this type from the TOML value
        return [("", f"expected {type_name(type_)}")]
    return [("", str(exc) or type(exc).__name__)]


_SEGMENT = re.compile(r"\.([^.\[]+)|\[(-?\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]")


def _toml_path(cattrs_path: str) -> str:
    """cattrs' path (``$.models['student'].widht``, ``$.losses[0]``) as a TOML key path."""
    out, pos = "", 1  # skip the "$" root
    while pos < len(cattrs_path):
        m = _SEGMENT.match(cattrs_path, pos)
        if m is None:  # not a path cattrs builds; keep the rest as it is
            return join_path(out, cattrs_path[pos:])
        attr, index, key = m.groups()
        if attr is not None:
            out = join_path(out, attr)
        elif index is not None:
            out = f"{out}[{index}]"
        else:
            out = join_path(out, toml_key(ast.literal_eval(key)))
        pos = m.end()
    return out


def toml_key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


def config_error(exc: BaseException) -> ConfigError:
    """Every problem in a cattrs structuring error, one ``(key path, message)`` each."""
    found: list[list[tuple[str, str]]] = []

    def fmt(leaf: BaseException, type_) -> str:
        found.append(_messages(leaf, type_))
        return str(len(found) - 1)  # a token: the problems are looked up, never parsed

    problems: list[tuple[str, str]] = []
    for line in transform_error(exc, "$", fmt):
        token, _, path = line.partition(" @ ")
        for key, message in found[int(token)]:
            problem = (join_path(_toml_path(path), key), message)
            if problem not in problems:
                problems.append(problem)
    return ConfigError(problems=problems)
