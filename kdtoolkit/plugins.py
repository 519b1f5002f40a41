"""Plugin discovery and the component registry.

One fresh ``pluggy.PluginManager`` per pipeline (``get_plugin_manager``); no module-global state.
Plugins are found through the ``kdtoolkit`` entry-point group, first-party ones included. A plugin
that fails to import is reported by name (``PluginLoadError``) and can be blocked with
``KDTOOLKIT_BLOCK_PLUGINS=name1,name2`` or the ``blocked`` argument (the pipeline's
``[plugins] blocked = [...]``).
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import os
from typing import Any, Callable, Iterable

import attrs
import pluggy

from kdtoolkit import hookspecs
from kdtoolkit.errors import ConfigError, PluginError
from kdtoolkit.registration import check_contract

PROJECT = "kdtoolkit"
BLOCK_ENV = "KDTOOLKIT_BLOCK_PLUGINS"

#: component kinds, in the order of the hook specifications; ``register_<kind>s`` is the hook.
KINDS = ("dataset", "model", "quantizer", "loss", "fusion", "schedule", "method")
HOOKS = {kind: f"register_{kind}es" if kind.endswith("s") else f"register_{kind}s" for kind in KINDS}


@attrs.frozen
class Component:
    """One registered component: what a ``register(...)`` call recorded."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options: type | None
    plugin: str
    description: str = ""
    #: losses: the input names (``register(..., inputs=...)`` or the factory's ``inputs``)
    inputs: tuple[str, ...] = ()
    #: fusions: called with ``labels=`` (``register(..., needs_labels=True)``)
    needs_labels: bool = False
    #: other components this one needs, by kind (``register(..., requires={"fusion": ["importance"]})``)
    requires: dict[str, tuple[str, ...]] = attrs.Factory(dict)

    def make_options(self, **values):
        """Build this component's options from keyword values (defaults for the rest)."""
        if self.options is None:
            if values:
                raise TypeError(f"{self.kind} {self.name!r} takes no options, got {sorted(values)}")
            return None
        return self.options(**values)


class Registry:
    """Components by kind and name, with the plugin that registered each."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def add(self, component: Component) -> None:
        table = self._components[component.kind]
        if component.name in table:
            other = table[component.name]
            raise PluginError(
                f"duplicate {component.kind} name {component.name!r}: registered by plugin "
                f"{other.plugin!r} and by plugin {component.plugin!r}"
            )
        table[component.name] = component

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._components[kind][name]
        except KeyError:
            raise ConfigError(
                f"unknown {kind} {name!r}; installed: {', '.join(sorted(self._components[kind])) or 'none'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._components[kind]

    def components(self, kind: str | None = None) -> Iterable[Component]:
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            yield from self._components[k].values()


def _blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager(
    *, load_entrypoints: bool = True, blocked: Iterable[str] = (), plugins: Iterable[Any] = ()
) -> pluggy.PluginManager:
    """A fresh plugin manager with every installed plugin (minus blocked ones) and ``plugins``.

    ``plugins`` are extra plugin objects (modules or instances with ``@hookimpl`` methods), for
    plugins defined in Python rather than installed.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in set(blocked) | _blocked_from_env():
        pm.set_blocked(name)
    if load_entrypoints:
        _load_entrypoints(pm)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin) or exc.plugin!r}: {exc}") from None
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    # Like pm.load_setuptools_entrypoints, but a plugin that fails to import is named in the error
    # (with the way to block it) instead of surfacing as a bare traceback.
    for dist in list(importlib_metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != PROJECT or pm.get_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
                raise PluginError(
                    f"plugin {ep.name!r} (from {dist.metadata['name']}) failed to import: "
                    f"{type(exc).__name__}: {exc}. Block it with {BLOCK_ENV}={ep.name} "
                    f"or [plugins] blocked = [\"{ep.name}\"] in the pipeline"
                ) from exc
            pm.register(plugin, name=ep.name)
            _versions(pm)[ep.name] = dist.version


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str | None]:
    """Plugin name -> version of the distribution that provides it (None if not installed)."""
    return {name: _versions(pm).get(name) for name, _ in pm.list_name_plugin()}


def _versions(pm: pluggy.PluginManager) -> dict[str, str]:
    if not hasattr(pm, "_kdtoolkit_versions"):
        pm._kdtoolkit_versions = {}
    return pm._kdtoolkit_versions


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call every ``register_<kind>s`` hook and return the filled registry."""
    registry = Registry()
    for kind in KINDS:
        hook = getattr(pm.hook, HOOKS[kind])
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(
                name: str,
                factory: Callable[..., Any],
                *,
                options: type | None = None,
                description: str = "",
                inputs: Iterable[str] | None = None,
                needs_labels: bool = False,
                requires: dict[str, Iterable[str]] | None = None,
                _kind: str = kind,
                _plugin: str = plugin_name,
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {_kind} with a bad name {name!r}")
                if not callable(factory):
                    raise PluginError(f"plugin {_plugin!r}: {_kind} {name!r} factory is not callable")
                if options is not None and not attrs.has(options):
                    raise PluginError(f"plugin {_plugin!r}: {_kind} {name!r} options must be an attrs class")
                contract = check_contract(_kind, name, factory, _plugin, kinds=KINDS, inputs=inputs, needs_labels=needs_labels, requires=requires)
                registry.add(Component(_kind, name, factory, options, _plugin, description, **contract))

            impl.function(**{"register": register})
    return registry


def load_registry(*, blocked: Iterable[str] = (), plugins: Iterable[Any] = (), load_entrypoints: bool = True) -> Registry:
    """Convenience: a fresh plugin manager, collected into a registry."""
    return collect(get_plugin_manager(blocked=blocked, plugins=plugins, load_entrypoints=load_entrypoints))
