"""Which exceptions that are not ``KDToolkitError``s are still the user's or the machine's doing.

``describe(exc)`` gives the one line the CLI prints (exit 2) for an anticipated failure: the file
system (a read-only or full disk, a file where a directory belongs: names the file), running out of
memory, input too deeply nested to read, bytes that are not UTF-8, and plugins (a hook whose
signature does not match its specification, an exception raised inside a plugin's ``register_*``
hook: names the plugin's file). ``None`` means a bug.
"""

from __future__ import annotations

import errno
import os
import traceback

import pluggy
import torch


def describe(exc: BaseException) -> str | None:
    plugin = _plugin_frame(exc)
    if plugin is not None:
        return f"plugin hook {plugin.name} ({plugin.filename}:{plugin.lineno}) raised {type(exc).__name__}: {_short(exc)}"
    if isinstance(exc, pluggy.PluginValidationError):
        return f"plugin {getattr(exc, 'plugin', None)!r}: {_short(exc)}"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or _cpu_allocation_failed(exc):
        return f"out of memory ({_short(exc) or type(exc).__name__}); lower the batch size or the model's width/depth"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read (RecursionError); check the pipeline file and --set values"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else "file system"
        text = exc.strerror or os.strerror(exc.errno)
        hint = "; free some space and continue with --resume" if exc.errno == errno.ENOSPC else ""
        return f"{where}: {text}{hint}"
    return None


def _cpu_allocation_failed(exc: BaseException) -> bool:
    # the CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _plugin_frame(exc: BaseException):
    """The frame of a plugin's ``register_*`` hook the exception came out of, if any: the frame
    right below ``kdtoolkit.plugins.collect`` in the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for outer, inner in zip(frames, frames[1:]):
        if outer.name == "collect" and outer.filename.endswith(os.path.join("kdtoolkit", "plugins.py")):
            if inner.filename != outer.filename:
                return inner
    return None
