"""Where datasets live on disk."""

from __future__ import annotations

import os
import pathlib

DATA_ENV = "KDTOOLKIT_DATA"

__all__ = ["DATA_ENV", "resolve_data_root"]


def resolve_data_root(configured: str | os.PathLike | None, recorded: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory datasets are read from (and downloaded to).

    In order: ``configured`` (the pipeline's ``data.root``; ``~`` expanded, a relative path taken
    from the current directory), else ``$KDTOOLKIT_DATA``, else ``recorded`` if it is a directory
    (the root a run directory says its training read, for ``kdtoolkit eval``), else
    ``$XDG_CACHE_HOME/kdtoolkit/data``, else ``~/.cache/kdtoolkit/data``. The result is absolute; it
    need not exist.
    """
    if configured is not None and str(configured) != "":
        return _absolute(configured)
    env = os.environ.get(DATA_ENV)
    if env:
        return _absolute(env)
    if recorded and pathlib.Path(recorded).is_dir():
        return _absolute(recorded)
    cache = os.environ.get("XDG_CACHE_HOME")
    base = _absolute(cache) if cache else pathlib.Path.home() / ".cache"
    return base / "kdtoolkit" / "data"


def _absolute(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.abspath(pathlib.Path(path).expanduser()))
