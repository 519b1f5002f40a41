"""kdtoolkit: knowledge distillation and quantization-aware training, composed from plugins."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@kdtoolkit.hookimpl def register_losses(register): ...``
hookimpl = pluggy.HookimplMarker("kdtoolkit")

__all__ = ["hookimpl", "__version__", "Pipeline"]


def __getattr__(name):  # lazy: plugins import ``hookimpl`` without importing the engine (and torch)
    if name == "Pipeline":
        from kdtoolkit.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
