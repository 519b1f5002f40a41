"""Commands that plugins add to the ``kdtoolkit`` command line (the ``register_commands`` hook).

``PluginCommandGroup`` is the CLI's top-level ``click.Group``: its commands are its own (``run``,
``validate``, ...) plus those of the installed plugins. Plugins are loaded only when a command is
not a built-in one, or when all commands are listed (``kdtoolkit --help``), so a broken plugin never
stops ``kdtoolkit run``. Each plugin gets its own ``click.Group`` to add commands to, so every
command is attributed to its plugin and a name clash is reported with both owners.
"""

from __future__ import annotations

from typing import Callable

import click

from kdtoolkit.errors import KDToolkitError, PluginError

__all__ = ["PluginCommandGroup", "plugin_commands"]

HOOK = "register_commands"


def plugin_commands(pm, reserved=(), error_boundary: Callable | None = None) -> dict[str, click.Command]:
    """``{name: command}`` added by every ``register_commands`` implementation of ``pm``.

    ``reserved`` are the built-in command names. Raises ``PluginError`` when a plugin adds a name that
    is reserved or already added by another plugin (naming both). ``error_boundary`` (a decorator,
    e.g. the CLI's ``user_errors``) wraps every callback, nested groups included.
    """
    owners = {name: "the kdtoolkit command line" for name in reserved}
    out: dict[str, click.Command] = {}
    for impl in getattr(pm.hook, HOOK).get_hookimpls():
        group = click.Group(name=impl.plugin_name)
        impl.function(**{arg: group for arg in impl.argnames if arg == "cli"})
        for name, command in group.commands.items():
            if name in owners:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} adds the command {name!r}, which {owners[name]} already provides; "
                    "block one of the plugins (KDTOOLKIT_BLOCK_PLUGINS=name)"
                )
            owners[name] = f"plugin {impl.plugin_name!r}"
            out[name] = _guarded(command, error_boundary) if error_boundary else command
    return out


def _guarded(command: click.Command, boundary: Callable) -> click.Command:
    if command.callback is not None:
        command.callback = boundary(command.callback)
    for sub in getattr(command, "commands", {}).values():
        _guarded(sub, boundary)
    return command


class PluginCommandGroup(click.Group):
    """A ``click.Group`` that also offers the commands of the installed plugins.

    ``error_boundary``: a decorator applied to every plugin command's callback (the CLI passes its
    own, so plugin commands report ``KDToolkitError`` as one line and exit 2, like built-in ones).
    """

    def __init__(self, *args, error_boundary: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_boundary = error_boundary
        self._plugin_commands: dict[str, click.Command] | None = None
        self._plugin_error: str | None = None

    def plugin_commands(self) -> dict[str, click.Command]:
        """The plugins' commands, loaded once (empty, with ``plugin_error`` set, if loading failed)."""
        if self._plugin_commands is None:
            from kdtoolkit.plugins import get_plugin_manager

            try:
                self._plugin_commands = plugin_commands(get_plugin_manager(), self.commands, self.error_boundary)
            except KDToolkitError as exc:
                self._plugin_commands, self._plugin_error = {}, str(exc)
        return self._plugin_commands

    @property
    def plugin_error(self) -> str | None:
        return self._plugin_error

    def list_commands(self, ctx: click.Context) -> list[str]:
        extra = self.plugin_commands()
        if self._plugin_error:
            click.echo(f"warning: plugin commands are not available: {self._plugin_error}", err=True)
        return sorted(set(super().list_commands(ctx)) | set(extra))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        command = self.plugin_commands().get(name)
        if command is None and self._plugin_error:
            raise click.UsageError(f"no command {name!r} (plugin commands are not available: {self._plugin_error})", ctx)
        return command
