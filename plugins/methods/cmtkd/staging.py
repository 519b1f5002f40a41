"""Stages declared by module paths, for models that do not implement ``StagedModel`` themselves.

CMT-KD (Pham et al., WACV 2023) fuses the teachers' features at the end of each stage and feeds the
fused feature to the next stage of every teacher, so it runs networks stage by stage
(``forward_stage(k, x)``, see :class:`kdtoolkit.models.StagedModel`). The built-in CIFAR models and
torchvision's ResNets are staged by hand; any other model can be staged from a list of module paths:

    model = torchvision.models.mobilenet_v2(num_classes=100)
    staged_from_paths(model, ["features.3", "features.6", "features.13"])
    x = model.forward_stage(0, images)    # stem .. features.3
    ...
    logits = model.forward_stage(3, x)    # features.14 .. classifier (the head)

How: the model is traced with ``torch.fx``; every module that does not contain a stage path is a
leaf of the trace (so quantized layers, custom blocks and their autograd functions are never traced
into), and the graph is cut after the call of each stage path. A cut is valid when the stage path's
output is the *only* value that crosses it: the network must be a chain at the cut points. Each piece
becomes generated Python code run against the live model (``self`` is the model itself, every module
and buffer is looked up on every call), so moving the model to a device, loading a state dict or
quantizing it in place later all stay in effect. If the forward branches on ``self.training`` at a
traced level, the train-mode and eval-mode graphs are both kept and the model's mode picks one.

The model is modified in place and only by its class: it becomes a subclass of its own class that adds
``stage_paths`` and ``forward_stage`` (as ``StagedResNet`` does for torchvision's ResNet). Its
parameters, module paths, state dict and ``forward`` are unchanged.

Problems (not traceable, an unknown path, a path called twice, paths out of order, a skip connection
over a cut) raise :class:`~kdtoolkit.errors.ConfigError` naming the key and saying how to declare
stages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from kdtoolkit.api import ConfigError

__all__ = ["StagedFromPaths", "as_staged", "is_staged", "split_points_hint", "stage_paths_of", "staged_from_paths"]

#: the TOML key where stage paths are declared (used in error messages)
STAGES_KEY = "method.stages"

_HOW = (
    'declare stages as module paths whose outputs cut the network into a chain, in execution order: '
    '[method] stages = ["features.3", "features.6", ...] (each stage\'s output must be the only value '
    'passed on to the rest of the network: no skip connection may cross a cut)'
)


class _StageTracer(fx.Tracer):
    """Traces only into the root and the modules that contain a stage path; everything else is a leaf."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.paths = tuple(paths)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name
        if name in self.paths:
            return True
        return not any(p.startswith(name + ".") for p in self.paths)


class StagedFromPaths:
    """Mixin of the classes made by :func:`staged_from_paths` (``isinstance`` tells a split model)."""

    stage_paths: tuple[str, ...]
    #: the class the model had before it was staged
    _kdtoolkit_base_class: type

    def forward_stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``k`` (``0 .. len(stage_paths)``; the last one is the head that gives the logits)."""
        train_fns, eval_fns = self.__dict__["_kdtoolkit_stage_fns"]
        fns = train_fns if self.training else eval_fns
        if not 0 <= k < len(fns):
            raise IndexError(f"{type(self).__name__} has stages 0..{len(fns) - 1} ({len(fns) - 1} = head), got {k}")
        return fns[k](self, x)

    def stage_code(self, k: int, training: bool | None = None) -> str:
        """The generated Python source of stage ``k`` (for debugging)."""
        train_src, eval_src = self.__dict__["_kdtoolkit_stage_src"]
        return (train_src if (self.training if training is None else training) else eval_src)[k]


_CLASSES: dict[type, type] = {}


def _staged_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Staged{base.__name__}", (StagedFromPaths, base), {"_kdtoolkit_base_class": base})
    return _CLASSES[base]


def is_staged(model: nn.Module) -> bool:
    """Whether ``model`` can run stage by stage (``stage_paths`` and ``forward_stage``)."""
    return bool(getattr(model, "stage_paths", None)) and callable(getattr(model, "forward_stage", None))


def split_points_hint(model: nn.Module, limit: int = 8) -> str:
    """A hint naming candidate stage paths: the children of the model's longest ``nn.Sequential``."""
    best_path, best_len = None, 0
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) > best_len:
            best_path, best_len = path, len(module)
    if best_path is None or best_len < 2:
        top = [n for n, _ in model.named_children()]
        return f"top-level modules: {', '.join(top[:limit])}" if top else ""
    names = [f"{best_path}.{n}" if best_path else n for n, _ in model.get_submodule(best_path).named_children()]
    shown = ", ".join(names[:limit]) + (f", … {names[-1]}" if len(names) > limit else "")
    return f"candidates: the children of {best_path or 'the model'!r} ({shown})"


def _set_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    for name, module in model.named_modules():
        module.training = modes[name]


def _trace(model: nn.Module, paths: Sequence[str], training: bool, where: str, label: str) -> fx.Graph:
    saved = {name: m.training for name, m in model.named_modules()}
    model.train(training)
    try:
        return _StageTracer(paths).trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types (TraceError, TypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(problems=[(where, (
            f"{label}: cannot trace the model with torch.fx to split it into stages ({type(exc).__name__}: {first}). "
            "Only the modules that contain a stage path are traced into, so choose stage paths whose enclosing "
            "modules have no data-dependent control flow, or use a model with built-in stages "
            "(stage_paths and forward_stage, see kdtoolkit.models.StagedModel); " + _HOW
        ))]) from None
    finally:
        _set_modes(model, saved)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"the output of {node.target!r}"
    if node.op == "placeholder":
        return "the model's input"
    target = getattr(node.target, "__name__", str(node.target))
    return f"the value {node.name!r} ({node.op} {target})"


def _split(graph: fx.Graph, paths: Sequence[str], where: str, label: str, hint: str) -> list[fx.Graph]:
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise ConfigError(problems=[(where, f"{label}: the model's forward takes no input")])
    x = placeholders[0]
    for extra in placeholders[1:]:
        if extra.users:
            raise ConfigError(problems=[(where, f"{label}: forward uses a second input {extra.target!r}; staging supports forward(x) only")])
    hint = f"; {hint}" if hint else ""
    cuts: list[fx.Node] = []
    for path in paths:
        calls = [n for n in nodes if n.op == "call_module" and n.target == path]
        if not calls:
            raise ConfigError(problems=[(where, (
                f"{label}: stage path {path!r} is not called by the model's forward (not a module of the model, "
                f"or not used){hint}; " + _HOW
            ))])
        if len(calls) > 1:
            raise ConfigError(problems=[(where, f"{label}: module {path!r} is called {len(calls)} times in forward; a stage must end at a module called once; " + _HOW)])
        cuts.append(calls[0])
    for a, b, pa, pb in zip(cuts, cuts[1:], paths, paths[1:]):
        if position[b] <= position[a]:
            raise ConfigError(problems=[(where, f"{label}: stage paths must be listed in execution order: {pb!r} runs before {pa!r}")])

    def stage_of(node: fx.Node) -> int:
        if node.op == "output":
            return len(cuts)
        return sum(1 for c in cuts if position[c] < position[node])

    def free(node: fx.Node) -> bool:  # parameters/buffers read directly: copied into every stage that reads them
        return node.op == "get_attr"

    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        s = stage_of(node)
        for arg in node.all_input_nodes:
            if free(arg):
                continue
            if arg is x:
                if s != 0:
                    raise ConfigError(problems=[(where, (
                        f"{label}: the model's input is used after the cut at {paths[s - 1]!r} (by {_describe(node)}); "
                        "a skip connection crosses that stage boundary; " + _HOW
                    ))])
                continue
            t = stage_of(arg)
            if t == s or (t == s - 1 and arg is cuts[t]):
                continue
            boundary = paths[t] if t < len(cuts) else paths[-1]
            raise ConfigError(problems=[(where, (
                f"{label}: {_describe(arg)} (stage {t}) is used by {_describe(node)} in stage {s}, across the cut at "
                f"{boundary!r}: the output of {boundary!r} is not a cut of the graph (a skip connection or a second "
                "value crosses it); " + _HOW
            ))])
    for k, cut in enumerate(cuts):
        if not any(stage_of(u) == k + 1 for u in cut.users):
            raise ConfigError(problems=[(where, (
                f"{label}: the output of stage path {paths[k]!r} is not used by the rest of the network, so it does "
                "not end a stage; " + _HOW
            ))])

    pieces: list[fx.Graph] = []
    for k in range(len(cuts) + 1):
        g = fx.Graph()
        inp = g.placeholder("x")
        env: dict[fx.Node, fx.Node] = {(x if k == 0 else cuts[k - 1]): inp}

        def lookup(n: fx.Node, g=g, env=env) -> fx.Node:
            if n not in env:  # a get_attr read in this stage
                env[n] = g.node_copy(n, lambda a: env[a])
            return env[n]

        for node in nodes:
            if node.op in ("placeholder", "get_attr") or stage_of(node) != k:
                continue
            env[node] = g.node_copy(node, lookup)
        if k < len(cuts):
            g.output(env[cuts[k]])
        g.lint()
        pieces.append(g)
    return pieces


def _compile(graph: fx.Graph, name: str) -> tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], str]:
    code = graph.python_code(root_module="self")
    namespace: dict[str, Any] = dict(code.globals)
    exec(compile(code.src, f"<kdtoolkit stage {name}>", "exec"), namespace)  # noqa: S102 - fx-generated code
    return namespace["forward"], code.src


def _plan(model: nn.Module, paths: Sequence[str], where: str, label: str | None):
    """The compiled stage functions and their sources for ``model`` split at ``paths``; the model is
    not changed. Raises ``ConfigError`` (at key ``where``) when it cannot be split there."""
    label = label or type(model).__name__
    paths = tuple(paths)
    if not paths:
        raise ConfigError(problems=[(where, f"{label}: no stage paths given; " + _HOW)])
    if len(set(paths)) != len(paths):
        raise ConfigError(problems=[(where, f"{label}: stage paths must be distinct, got {list(paths)}")])
    modules = dict(model.named_modules())
    hint = split_points_hint(model)
    for p in paths:
        if p not in modules or p == "":
            raise ConfigError(problems=[(where, f"{label}: no module {p!r} in the model{'; ' + hint if hint else ''}")])
    graphs = {training: _split(_trace(model, paths, training, where, label), paths, where, label, hint) for training in (True, False)}
    train = [_compile(g, f"{label}[{k}]") for k, g in enumerate(graphs[True])]
    evals = []
    for k, (g, (fn, src)) in enumerate(zip(graphs[False], train)):
        # the same code in both modes (the usual case): share it; else keep the eval-mode trace too
        evals.append((fn, src) if g.python_code("self").src == src else _compile(g, f"{label}[{k}] eval"))
    fns = ([f for f, _ in train], [f for f, _ in evals])
    srcs = ([s for _, s in train], [s for _, s in evals])
    return fns, srcs


def staged_from_paths(model: nn.Module, paths: Sequence[str], *, where: str = STAGES_KEY, label: str | None = None) -> nn.Module:
    """Make ``model`` a ``StagedModel`` whose stage ``k`` ends at the module ``paths[k]``; returns it.

    ``forward_stage(k, x)`` for ``k < len(paths)`` maps stage k's input (the image for k = 0) to the
    output of ``paths[k]``; ``forward_stage(len(paths), x)`` is the rest of the forward (the head).
    The chain of all stages computes exactly what ``forward`` computes. The model keeps its parameters,
    module paths, state dict and ``forward``; only its class changes (to a subclass of its own).
    Raises ``ConfigError`` (at key ``where``) when the model cannot be split at those paths.
    """
    fns, srcs = _plan(model, paths, where, label)
    base = getattr(type(model), "_kdtoolkit_base_class", type(model))
    model.__class__ = _staged_class(base)
    model.__dict__["_kdtoolkit_stage_fns"] = fns
    model.__dict__["_kdtoolkit_stage_src"] = srcs
    model.__dict__["stage_paths"] = tuple(paths)
    return model


def stage_paths_of(model: nn.Module, paths: Sequence[str] | None = None, *, name: str = "model", where: str = STAGES_KEY) -> tuple[str, ...]:
    """The stage paths ``as_staged`` would give ``model``, without changing it (the same
    ``ConfigError`` when it cannot be staged)."""
    if paths:
        _plan(model, paths, where, f"models.{name} ({type(model).__name__})")
        return tuple(paths)
    if is_staged(model):
        return tuple(model.stage_paths)
    raise _no_stages(model, name)


def as_staged(model: nn.Module, paths: Sequence[str] | None = None, *, name: str = "model", where: str = STAGES_KEY) -> nn.Module:
    """``model`` ready to run stage by stage: split at ``paths`` when given, else its own stages.

    A model without built-in stages and without ``paths`` gets a ``ConfigError`` (at ``models.<name>``)
    saying how to declare them.
    """
    if paths:
        return staged_from_paths(model, paths, where=where, label=f"models.{name} ({type(model).__name__})")
    if is_staged(model):
        return model
    raise _no_stages(model, name)


def _no_stages(model: nn.Module, name: str) -> ConfigError:
    hint = split_points_hint(model)
    return ConfigError(problems=[(f"models.{name}", (
        f"{type(model).__name__} has no built-in stages (stage_paths/forward_stage) and this method runs networks "
        f"stage by stage; " + _HOW + (f"; {hint}" if hint else "")
    ))])
