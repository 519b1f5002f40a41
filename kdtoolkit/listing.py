"""What ``kdtoolkit plugins`` and ``kdtoolkit describe`` print: installed plugins (loaded, blocked or
broken, one line of error each), their components with descriptions, and a component's options with
types and defaults. Nothing here builds a model or compiles a kernel."""

from __future__ import annotations

from typing import Any

import attrs

from kdtoolkit.config.converter import COMPONENT_METADATA
from kdtoolkit.config.problems import did_you_mean, type_name
from kdtoolkit.config.schema import KIND_CONFIGS, generic_keys
from kdtoolkit.errors import ConfigError
from kdtoolkit.plugins import KINDS, Component, Registry, collect, get_plugin_manager, plugin_records


def plugin_rows(blocked: list[str] | tuple = ()) -> list[dict[str, Any]]:
    """One row per plugin: name, version, distribution, status (loaded/blocked/broken), error,
    provides ({kind: [names]}) and components ([{kind, name, description}])."""
    pm = get_plugin_manager(blocked=blocked, on_error="record")
    broken: dict[str, str] = {}
    registry = collect(pm, broken=broken)
    rows = []
    for record in sorted(plugin_records(pm), key=lambda r: (r.name, r.distribution or "")):
        components = [c for c in registry.components() if c.plugin == record.name and record.status == "loaded"]
        status, error = record.status, record.error
        if record.name in broken:
            status, error = "broken", broken[record.name]
        provides: dict[str, list[str]] = {}
        for c in components:
            provides.setdefault(c.kind, []).append(c.name)
        rows.append({
            "name": record.name,
            "version": record.version,
            "distribution": record.distribution,
            "status": status,
            "error": error,
            "provides": {k: sorted(v) for k, v in provides.items()},
            "components": [{"kind": c.kind, "name": c.name, "description": c.description} for c in components],
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        head = f"{row['name']} {row['version'] or ''}".rstrip()
        if row["distribution"] and row["distribution"] != "kdtoolkit":
            head += f" ({row['distribution']})"
        if row["status"] == "blocked":
            lines.append(f"{head}: blocked")
            continue
        if row["status"] == "broken":
            lines.append(f"{head}: broken: {row['error']}")
            continue
        lines.append(head)
        width = max((len(f"{c['kind']}: {c['name']}") for c in row["components"]), default=0)
        for c in sorted(row["components"], key=lambda c: (KINDS.index(c["kind"]), c["name"])):
            label = f"{c['kind']}: {c['name']}"
            lines.append(f"  {label:<{width}}  {c['description']}".rstrip())
    return lines


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "required"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        try:
            value = field.default.factory()
        except TypeError:
            return "computed"
    else:
        value = field.default
    if value is None:
        return "default: unset"
    if isinstance(value, bool):
        return f"default: {str(value).lower()}"
    if isinstance(value, tuple):
        value = list(value)
    return f"default: {value!r}"


def option_lines(options: type | None) -> list[str]:
    """``  name: type (default: value)`` per option field."""
    if options is None:
        return ["  (no options)"]
    try:
        attrs.resolve_types(options)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is shown as written
        pass
    lines = []
    for f in attrs.fields(options):
        if COMPONENT_METADATA in f.metadata:
            kind = f.metadata[COMPONENT_METADATA]
            what = f"a {kind} table ({{ name = \"...\", ... }})"
        else:
            what = type_name(f.type) if f.type is not None else "any value"
            choices = getattr(f.validator, "options", None)  # attrs.validators.in_
            if isinstance(choices, (tuple, list, set, frozenset)):
                what = "one of " + ", ".join(repr(c) for c in choices)
        line = f"  {f.name}: {what} ({_default(f)})"
        if f.metadata.get("description"):
            line += f"  {f.metadata['description']}"
        lines.append(line)
    return lines


def describe(registry: Registry, kind: str, name: str) -> list[str]:
    """What ``kdtoolkit describe KIND NAME`` prints."""
    if kind not in KINDS:
        raise ConfigError(problems=[("KIND", f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")])
    if (kind, name) not in registry:
        installed = registry.names(kind)
        raise ConfigError(problems=[("NAME", f"unknown {kind} {name!r}{did_you_mean(name, installed)}; installed: {', '.join(installed) or 'none'}")])
    comp: Component = registry.get(kind, name)
    lines = [f"{kind} {name!r} (plugin {comp.plugin!r})"]
    if comp.description:
        lines.append(f"  {comp.description}")
    lines.append("options:")
    lines += option_lines(comp.options)
    lines.append(f"generic keys of its table: {', '.join(generic_keys(KIND_CONFIGS[kind]))}")
    return lines
