"""The optimizer over every trained parameter, with parameter groups, and the LR schedule.

Groups come from the pipeline's ``[[optimizer.param_groups]]`` first, then the defaults the
components contribute: the method's ``param_groups()``, then any submodule (a loss, a fusion, a
fake-quantizer, a regressor) with a ``param_groups()`` method, whose patterns are relative to that
submodule (``["importance"]`` of ``losses.0.fusion`` matches ``losses.0.fusion.importance``). The
first matching group wins; unmatched parameters use the optimizer's values.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from kdtoolkit.config.schema import PipelineConfig
from kdtoolkit.errors import ConfigError
from kdtoolkit.plugins import Registry

Rule = tuple[list[str], float, "float | None"]


def _rule(group: Any, owner: str, prefix: str = "") -> Rule:
    if not isinstance(group, (tuple, list)) or len(group) not in (2, 3):
        raise TypeError(f"{owner}.param_groups(): expected (patterns, lr_scale[, weight_decay]), got {group!r}")
    patterns, scale, wd = (*group, None) if len(group) == 2 else group
    return [prefix + p for p in patterns], float(scale), wd


def default_groups(module: nn.Module) -> list[Rule]:
    """The default groups of ``module``'s method, then of every other submodule that has them."""
    method = module.method
    rules: list[Rule] = [_rule(g, type(method).__name__) for g in method.param_groups()]
    for name, sub in module.named_modules():
        if sub is module or sub is method or name.startswith("method."):
            continue
        groups = getattr(sub, "param_groups", None)
        if callable(groups):
            rules += [_rule(g, f"{type(sub).__name__} at {name}", f"{name}.") for g in groups()]
    return rules


def build_optimizer(cfg: PipelineConfig, module: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    rules: list[Rule] = [(list(g.params), g.lr_scale, g.weight_decay) for g in o.param_groups]
    rules += default_groups(module)
    groups: dict[int, dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        index = next((i for i, (patterns, _, _) in enumerate(rules) if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)), len(rules))
        if index not in groups:
            scale, wd = (rules[index][1], rules[index][2]) if index < len(rules) else (1.0, None)
            groups[index] = {"params": [], "names": [], "lr_scale": scale, "lr": o.lr * scale, "weight_decay": o.weight_decay if wd is None else wd}
        groups[index]["params"].append(p)
        groups[index]["names"].append(name)
    if not groups:
        raise ConfigError(problems=[("models", "nothing to train: every model is frozen")])
    param_groups = [groups[i] for i in sorted(groups)]
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_lr_schedule(cfg: PipelineConfig, registry: Registry):
    """The ``[optimizer.schedule]`` plugin (a multiplier of the learning rate), or None."""
    sched = cfg.optimizer.schedule
    return registry.get("schedule", sched.name).factory(sched.options) if sched else None
