"""Intermediate features by dotted module path, through forward hooks (torchdistill-style).

No model is edited to return features: ``FeatureTaps(model, ["layer1", "layer2.1.conv2"])``
registers forward hooks on those modules and collects their outputs at each forward.

Paths are ``named_modules()`` names (integer components index ``nn.Sequential``/``nn.ModuleList``,
negative ones too). Wrapper prefixes are transparent: a path written for the bare model works on the
model wrapped in ``DistributedDataParallel``/``DataParallel`` (``module.``) or ``torch.compile``
(``_orig_mod.``), and a path with those prefixes works on the bare model. Create taps *after*
quantization has replaced layers (a hook sits on the module object found at creation time).
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from kdtoolkit.errors import ConfigError

#: child names used by wrappers that hold the real model as their only child.
WRAPPER_ATTRS = ("module", "_orig_mod")

__all__ = ["FeatureTaps", "UnknownModulePath", "resolve_module", "suggest_paths", "unwrap"]


class UnknownModulePath(ConfigError):
    """A module path that names no module; ``suggestions`` are the closest real paths."""

    def __init__(self, path: str, suggestions: list[str], model_name: str = "model"):
        self.path = path
        self.suggestions = list(suggestions)
        hint = f"; closest: {', '.join(self.suggestions)}" if self.suggestions else ""
        super().__init__(f"no module at path {path!r} in {model_name}{hint}")


def _wrapped_child(module: nn.Module) -> nn.Module | None:
    """The wrapped model if ``module`` is a wrapper (its only child is ``module`` or ``_orig_mod``)."""
    children = list(module.named_children())
    if len(children) == 1 and children[0][0] in WRAPPER_ATTRS:
        return children[0][1]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel/torch.compile-style wrappers (nested ones too)."""
    while (inner := _wrapped_child(model)) is not None:
        model = inner
    return model


def _walk(model: nn.Module, parts: list[str]) -> nn.Module | None:
    module = model
    for part in parts:
        children = module._modules
        if part in children and children[part] is not None:
            module = children[part]
            continue
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            try:
                module = module[int(part)]
                continue
            except (ValueError, IndexError):
                return None
        return None
    return module


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at dotted ``path`` (``""`` is the model itself).

    Tried in order: the path as written on ``model``; then with leading wrapper components
    (``module.``, ``_orig_mod.``) of the path dropped, and on the model with its wrappers stripped.
    Raises ``UnknownModulePath`` (a ``ConfigError``) listing the closest real paths.
    """
    if not isinstance(path, str):
        raise TypeError(f"module path must be a string, got {type(path).__name__}")
    parts = path.split(".") if path else []
    path_variants = [parts]
    stripped = parts
    while stripped and stripped[0] in WRAPPER_ATTRS:
        stripped = stripped[1:]
        path_variants.append(stripped)
    models = [model]
    while (inner := _wrapped_child(models[-1])) is not None:
        models.append(inner)
    for candidate_model in models:
        for variant in path_variants:
            found = _walk(candidate_model, variant)
            if found is not None:
                return found
    raise UnknownModulePath(path, suggest_paths(model, path), type(unwrap(model)).__name__)


def suggest_paths(model: nn.Module, path: str, n: int = 5) -> list[str]:
    """Up to ``n`` real module paths closest to ``path`` (paths of the unwrapped model)."""
    names = [name for name, _ in unwrap(model).named_modules() if name]
    query = path.split(".")
    while query and query[0] in WRAPPER_ATTRS:
        query = query[1:]
    query_str = ".".join(query)
    matches = difflib.get_close_matches(query_str, names, n=n, cutoff=0.5)
    if len(matches) < n:  # also paths sharing the last component (e.g. a misspelled parent)
        last = query[-1] if query else ""
        for name in names:
            if len(matches) >= n:
                break
            if last and name.split(".")[-1] == last and name not in matches:
                matches.append(name)
    if not matches:
        matches = difflib.get_close_matches(query_str, names, n=n, cutoff=0.0)
    return matches


class FeatureTaps:
    """Forward hooks that capture the outputs of modules given by path.

    ``taps.features`` maps each path (as given) to the output of that module during the latest
    forward of ``model``: a forward pre-hook on ``model`` clears it at every call, and each tapped
    module overwrites its entry (a module called twice keeps its last output). Outputs keep autograd
    (no detach) and their memory format. ``remove()`` (or leaving a ``with`` block) removes the hooks
    (the last features stay readable).

    >>> with FeatureTaps(net, ["layer1", "layer2"]) as taps:
    ...     logits = net(x)
    ...     f1, f2 = taps["layer1"], taps["layer2"]
    """

    def __init__(self, model: nn.Module, paths: Iterable[str] | str):
        if isinstance(paths, str):
            paths = [paths]
        self.paths: tuple[str, ...] = tuple(dict.fromkeys(paths))
        self.model = model
        self.features: dict[str, torch.Tensor] = {}
        modules = {path: resolve_module(model, path) for path in self.paths}  # all errors before any hook
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for path, module in modules.items():
            self._handles.append(module.register_forward_hook(self._capture(path)))

    def _on_model_forward(self, module, args) -> None:
        self.features = {}

    def _capture(self, path: str):
        def hook(module, args, output):
            self.features[path] = output

        return hook

    def clear(self) -> None:
        self.features = {}

    def __getitem__(self, path: str) -> torch.Tensor:
        try:
            return self.features[path]
        except KeyError:
            raise KeyError(
                f"no feature captured for {path!r} (tapped: {list(self.paths)}; "
                f"captured in the last forward: {list(self.features)})"
            ) from None

    def get(self, paths: Iterable[str]) -> list[torch.Tensor]:
        """The captured features of ``paths``, in that order."""
        return [self[p] for p in paths]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps({list(self.paths)}, active={bool(self._handles)})"
