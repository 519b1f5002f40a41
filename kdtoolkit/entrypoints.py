"""Plugins found through the ``kdtoolkit`` entry-point group, and what became of each.

Every distribution on ``sys.path`` is read once (the first copy of a distribution wins, as for
imports). Two *different* distributions that publish the same entry-point name are an error naming
both, whatever the order of ``sys.path``: silently loading one of them would drop the other's
components. A plugin that fails to import is an error naming it (and how to block it), or, for
listings (``kdtoolkit plugins``), a record with its one-line error.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import re
from typing import Any, Callable, Literal

import attrs

from kdtoolkit.errors import PluginError

GROUP = "kdtoolkit"
BLOCK_ENV = "KDTOOLKIT_BLOCK_PLUGINS"


@attrs.frozen
class PluginRecord:
    """One entry point of the ``kdtoolkit`` group: ``status`` is loaded, blocked or broken."""

    name: str
    distribution: str | None
    version: str | None
    status: Literal["loaded", "blocked", "broken"] = "loaded"
    error: str | None = None


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entry_points() -> dict[str, list[tuple[str, str, Any]]]:
    """Entry-point name -> ``[(distribution, version, entry point), ...]``, one per distribution."""
    found: dict[str, list[tuple[str, str, Any]]] = {}
    seen: set[str] = set()
    for dist in importlib_metadata.distributions():
        dist_name = dist.metadata["name"] or "?"
        if _normalized(dist_name) in seen:  # a second copy further down sys.path: shadowed
            continue
        seen.add(_normalized(dist_name))
        for ep in dist.entry_points:
            if ep.group == GROUP:
                found.setdefault(ep.name, []).append((dist_name, dist.version, ep))
    return found


def clash_message(name: str, providers: list[tuple[str, str, Any]]) -> str:
    dists = " and ".join(f"{d} {v}" for d, v, _ in sorted(providers, key=lambda p: p[0]))
    return (
        f"plugin name {name!r} is published by two distributions: {dists}; entry-point names must be "
        f"unique (rename one, uninstall one, or block the name with {BLOCK_ENV}={name})"
    )


def load_entrypoints(
    register: Callable[[Any, str], None],
    is_blocked: Callable[[str], bool],
    *,
    on_error: Literal["raise", "record"] = "raise",
) -> list[PluginRecord]:
    """Import every (unblocked) entry point and pass it to ``register(plugin, name)``.

    ``on_error="raise"``: a clash or an import failure raises ``PluginError``. ``"record"``: they are
    returned as ``broken`` records and the other plugins still load.
    """
    records: list[PluginRecord] = []
    for name, providers in sorted(entry_points().items()):
        dist, version, ep = providers[0]
        if is_blocked(name):
            records.append(PluginRecord(name, dist, version, "blocked"))
            continue
        if len(providers) > 1:
            message = clash_message(name, providers)
            if on_error == "raise":
                raise PluginError(message)
            records.extend(PluginRecord(name, d, v, "broken", message) for d, v, _ in providers)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
            message = (
                f"plugin {name!r} (from {dist}) failed to import: {type(exc).__name__}: {exc}. "
                f"Block it with {BLOCK_ENV}={name} or [plugins] blocked = [\"{name}\"] in the pipeline"
            )
            if on_error == "raise":
                raise PluginError(message) from exc
            records.append(PluginRecord(name, dist, version, "broken", message.splitlines()[0]))
            continue
        register(plugin, name)
        records.append(PluginRecord(name, dist, version))
    return records
