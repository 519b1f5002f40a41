"""The contract checks of ``register(...)``: what a component must declare, checked when its plugin
registers it, so a broken component is a ``PluginError`` naming the plugin, never a late traceback.

- a method factory is a ``kdtoolkit.methods.Method`` subclass, and defines no public member whose
  name is a near miss of a ``Method`` member (``default_loss`` for ``default_losses``), which the
  engine would silently never call;
- a loss declares its inputs (``inputs=`` or an ``inputs`` attribute of the factory);
- a fusion that needs the batch labels says so (``needs_labels=True``) and its ``forward`` takes them;
- ``requires`` names components by kind (``{"fusion": ["importance"]}``); ``validate`` checks that
  they are registered (``kdtoolkit.engine.checks``).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable, Mapping

from kdtoolkit.errors import PluginError

__all__ = ["check_contract", "METHOD_MEMBERS"]

#: the members of ``Method`` the engine calls (or a subclass overrides); see kdtoolkit.methods
METHOD_MEMBERS = (
    "check", "check_models", "prepare_models", "default_losses", "outputs", "extra_models",
    "param_groups", "epoch_metrics", "training_step", "evaluate_logits", "forward_outputs", "loss_terms",
)


def check_contract(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    plugin: str,
    *,
    kinds: Iterable[str],
    inputs: Iterable[str] | None = None,
    needs_labels: bool = False,
    requires: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """The contract fields of a ``Component`` (``inputs``, ``needs_labels``, ``requires``), or a
    ``PluginError`` naming ``plugin``."""
    where = f"plugin {plugin!r}: {kind} {name!r}"
    if kind == "method":
        _check_method(factory, where)
    declared: tuple[str, ...] = ()
    if kind == "loss":
        declared = _loss_inputs(factory, inputs, where)
    elif inputs is not None:
        raise PluginError(f"{where}: inputs= is for losses only")
    if needs_labels:
        if kind != "fusion":
            raise PluginError(f"{where}: needs_labels= is for fusions (a loss lists 'labels' in its inputs)")
        forward = getattr(factory, "forward", None)
        if forward is not None and not _accepts(forward, "labels"):
            raise PluginError(f"{where}: registered with needs_labels=True, but its forward() takes no 'labels' argument")
    required: dict[str, tuple[str, ...]] = {}
    for other_kind, names in (requires or {}).items():
        if other_kind not in kinds:
            raise PluginError(f"{where}: requires= names unknown kind {other_kind!r}; kinds: {', '.join(kinds)}")
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise PluginError(f"{where}: requires[{other_kind!r}] must be a list of component names, got {names!r}")
        required[other_kind] = tuple(names)
    return {"inputs": declared, "needs_labels": bool(needs_labels), "requires": required}


def _loss_inputs(factory, inputs, where: str) -> tuple[str, ...]:
    declared = inputs if inputs is not None else getattr(factory, "inputs", None)
    if declared is None:
        raise PluginError(
            f"{where} declares no inputs: register it with inputs=(\"student\", \"teacher\", ...) "
            "or give the factory an 'inputs' attribute"
        )
    if isinstance(declared, str) or not declared or not all(isinstance(i, str) and i for i in declared):
        raise PluginError(f"{where}: inputs must be a non-empty sequence of input names, got {declared!r}")
    return tuple(declared)


def _check_method(factory, where: str) -> None:
    from kdtoolkit.methods import LossTermsMethod, Method

    if not (isinstance(factory, type) and issubclass(factory, Method)):
        raise PluginError(f"{where}: the factory must be a subclass of kdtoolkit.methods.Method, got {factory!r}")
    own: set[str] = set()
    for klass in factory.__mro__:
        if klass in (Method, LossTermsMethod):
            break
        own.update(n for n in vars(klass) if not n.startswith("_"))
    for member in sorted(own - set(METHOD_MEMBERS)):
        close = difflib.get_close_matches(member, METHOD_MEMBERS, n=1, cutoff=0.85)
        if close:
            raise PluginError(
                f"{where}: member {member!r} is not part of the Method contract and the engine would never "
                f"call it; did you mean {close[0]!r}?"
            )


def _accepts(function, argument: str) -> bool:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True
    return argument in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
