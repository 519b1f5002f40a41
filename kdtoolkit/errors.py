"""Errors a user can act on. The CLI prints them as one line each and exits with code 2."""

from __future__ import annotations


class KDToolkitError(Exception):
    """Base class of errors caused by input (config, files, plugins), not by bugs."""

    exit_code = 2


class ConfigError(KDToolkitError):
    """One or more problems in a pipeline configuration.

    ``problems`` is a list of ``(key_path, message)``; ``str()`` gives one line per problem.
    """

    def __init__(self, message: str | None = None, *, problems: list[tuple[str, str]] | None = None):
        self.problems = list(problems or [])
        if message is not None and not self.problems:
            self.problems = [("", message)]
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(f"{path}: {msg}" if path else msg for path, msg in self.problems)

    def at(self, prefix: str) -> "ConfigError":
        """The same problems, with ``prefix`` put in front of every key path."""
        return ConfigError(problems=[(join_path(prefix, p), m) for p, m in self.problems])


class PluginError(KDToolkitError):
    """A plugin could not be loaded or registered something invalid."""


class CheckpointError(KDToolkitError):
    """A checkpoint or run directory is missing, incomplete or does not match the pipeline."""


def join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + (path if path.startswith("[") else "." + path)


class DataError(KDToolkitError):
    """A data file is missing, damaged or unsafe to read."""


class NonFiniteError(KDToolkitError):
    """Training produced a NaN or infinite loss or weight (``run.on_nonfinite``)."""
