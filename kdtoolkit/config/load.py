"""TOML (or a dict) -> ``PipelineConfig``, reporting every problem at once with its key path.

cattrs does the structuring and collects every error (``kdtoolkit.config.converter``);
``cattrs.transform_error`` walks them and ``kdtoolkit.config.problems`` words each one with its
TOML key path. The converter is built after the plugins have loaded.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

from cattrs.errors import ClassValidationError

from kdtoolkit.config.converter import make_converter
from kdtoolkit.config.problems import config_error, did_you_mean
from kdtoolkit.config.schema import SCHEMA_VERSION, PipelineConfig
from kdtoolkit.errors import ConfigError
from kdtoolkit.plugins import Registry

__all__ = ["apply_overrides", "did_you_mean", "make_converter", "read_toml", "structure", "unstructure"]


# --- entry points --------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` strings (``--set``); values are parsed as TOML, else kept as strings."""
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(("--set", f"expected KEY.PATH=VALUE, got {item!r}"))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
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
        raise config_error(exc) from None
    if cfg.schema_version < 1:
        raise ConfigError(problems=[("schema_version", f"must be {SCHEMA_VERSION}")])
    return cfg


def unstructure(cfg: PipelineConfig, registry: Registry) -> dict:
    """The plain dict (TOML/JSON-ready) form of a config; ``structure`` of it gives it back."""
    return make_converter(registry).unstructure(cfg)
