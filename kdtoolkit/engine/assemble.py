"""One assembly pass: a checked config becomes one ``Built`` that the trainer receives ready.

In order, each step once:

1. ``build_networks``: every model (``[models]`` and the method's ``extra_models``) from its plugin,
   quantized; the checks that need them (feature paths, ``Method.check_models``), all problems at
   once; pretrained weights; frozen models' gradients off; ``Method.prepare_models``.
2. ``assemble``: feature taps, loss terms (loss, fusion, schedule), the device and memory format,
   the DDP wrap (``engine.distributed.wrap_model``, the one place), the method, losses' ``setup`` on
   the shapes of one probe forward, the optimizer (with every component's default parameter
   groups) and the LR schedule.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch
from torch import nn

from kdtoolkit.config.schema import PipelineConfig
from kdtoolkit.engine.checks import effective_losses, feature_refs, loss_labels, method_component, published_refs, resolved_inputs
from kdtoolkit.engine.distributed import dist_info, wrap_model
from kdtoolkit.engine.optim import build_lr_schedule, build_optimizer
from kdtoolkit.engine.pretrained import load_pretrained
from kdtoolkit.errors import ConfigError, KDToolkitError
from kdtoolkit.features import FeatureTaps
from kdtoolkit.losses import LossTerm, Ref
from kdtoolkit.methods import Method, MethodContext
from kdtoolkit.plugins import Registry


class PipelineModule(nn.Module):
    """Everything with state: ``models``, ``losses`` and ``method``. Its state dict is what a
    checkpoint holds and its parameter names are what ``[[optimizer.param_groups]]`` match."""

    def __init__(self, models: dict[str, nn.Module], losses: list[LossTerm], method: Method):
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.losses = nn.ModuleList(losses)
        self.method = method

    def train(self, mode: bool = True):
        super().train(mode)
        self.method.train(mode)  # keeps frozen models in eval mode
        return self


@attrs.define
class Networks:
    """The built models and the loss terms' inputs, expanded and checked against them."""

    models: dict[str, nn.Module]
    inputs: list[dict[str, Any]]
    published: dict[str, str]
    num_classes: int


@attrs.define
class Built:
    """A built pipeline, ready to train."""

    config: PipelineConfig
    registry: Registry
    device: torch.device
    module: PipelineModule
    method: Method
    models: dict[str, nn.Module]
    taps: dict[str, FeatureTaps]
    num_classes: int
    optimizer: torch.optim.Optimizer | None = None
    lr_schedule: Callable[[float, int], float] | None = None
    data: Any = None


def build_model(cfg: PipelineConfig, registry: Registry, name: str, num_classes: int) -> nn.Module:
    """Model ``name`` of ``cfg`` from its plugin, quantized when it has a quantizer."""
    spec = cfg.models[name]
    model = registry.get("model", spec.name).factory(spec.options, num_classes=num_classes)
    if spec.quantizer is not None:
        import fnmatch

        from kdtoolkit.quant import quantize_model
        from kdtoolkit.quant.model import float_layers

        q = spec.quantizer
        paths = [path for path, _ in float_layers(model)]
        unmatched = [(f"models.{name}.quantizer.overrides[{i}].pattern",
                      f"{o.pattern!r} matches no conv/linear layer of this model; layers: {', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}")
                     for i, o in enumerate(q.overrides) if not any(fnmatch.fnmatchcase(p, o.pattern) for p in paths)]
        if unmatched:
            raise ConfigError(problems=unmatched)
        quantizer = registry.get("quantizer", q.name).factory(q.options)
        quantize_model(
            model,
            quantizer,
            weight_bits=q.options.weight_bits,
            act_bits=q.options.act_bits,
            keep_first_last=q.keep_first_last,
            overrides=q.overrides,
        )
    return model


def build_networks(cfg: PipelineConfig, registry: Registry, *, num_classes: int, load_weights: bool = True) -> Networks:
    """Step 1 (see the module docstring). ``load_weights=False`` leaves out the pretrained weights
    (checking a pipeline whose teacher runs do not exist yet)."""
    models = {name: build_model(cfg, registry, name, num_classes) for name in cfg.models}
    losses = effective_losses(cfg, registry)
    published = published_refs(cfg, registry)
    declared = [registry.get("loss", lc.name).inputs for lc in losses]
    inputs, problems = feature_refs([resolved_inputs(lc, d, cfg) for lc, d in zip(losses, declared)], models, published)
    method = method_component(cfg, registry).factory
    problems += method.check_models(cfg.method.options, cfg, models)
    if problems:
        raise ConfigError(problems=problems)
    for name, spec in cfg.models.items():
        if spec.checkpoint and load_weights:
            load_pretrained(models[name], spec, name)
        if spec.frozen:
            for p in models[name].parameters():
                p.requires_grad_(False)
    method.prepare_models(cfg.method.options, cfg, models)
    return Networks(models, inputs, published, num_classes)


def assemble(cfg: PipelineConfig, registry: Registry, networks: Networks, *, device: torch.device, sample: torch.Tensor | None) -> Built:
    """Step 2 (see the module docstring). ``sample`` is an input batch used once, without
    gradient and in eval mode, for the shapes that losses with ``setup`` build parameters from."""
    models, inputs, published = networks.models, networks.inputs, networks.published
    paths: dict[str, list[str]] = {name: [] for name in models}
    for term_inputs in inputs:
        for refs in term_inputs.values():
            for r in refs if isinstance(refs, list) else [refs]:
                if str(r) in published or r.model == "labels":
                    continue
                if r.feature is not None and r.feature not in paths[r.model]:
                    paths[r.model].append(r.feature)
    taps = {name: FeatureTaps(models[name], p) for name, p in paths.items() if p}
    losses = effective_losses(cfg, registry)
    terms = [make_term(registry, lc, term_inputs, label) for lc, term_inputs, label in zip(losses, inputs, loss_labels(losses))]

    for model in models.values():
        model.to(device)
        if cfg.run.channels_last:
            model.to(memory_format=torch.channels_last)
    for term in terms:
        term.to(device)
    if sample is not None:
        sample = sample.to(device)
    # Methods run the (possibly DDP-wrapped) models; checkpoints hold the bare ones, so their keys
    # never depend on how many processes trained them.
    info = dist_info()
    running = {name: wrap_model(m, info, device) for name, m in models.items()}
    ctx = MethodContext(models=running, specs=dict(cfg.models), losses=terms, taps=taps, num_classes=networks.num_classes, config=cfg, registry=registry, sample=sample)
    method = method_component(cfg, registry).factory(cfg.method.options, ctx)
    method.to(device)
    module = PipelineModule(models, terms, method)
    setup_losses(module, taps, sample, device)
    optimizer = build_optimizer(cfg, module)
    return Built(cfg, registry, device, module, method, models, taps, networks.num_classes, optimizer, build_lr_schedule(cfg, registry))


def make_term(registry: Registry, lc, term_inputs: dict[str, Any], label: str) -> LossTerm:
    """One loss term: the loss, its fusion and schedule built from their plugins."""
    component = registry.get("loss", lc.name)
    loss = component.factory(lc.options)
    fusion, fusion_needs_labels = None, False
    if lc.fusion is not None:
        fusion_component = registry.get("fusion", lc.fusion.name)
        fusion = fusion_component.factory(lc.fusion.options, num_inputs=len(term_inputs["teacher"]))
        fusion_needs_labels = fusion_component.needs_labels
    schedule = registry.get("schedule", lc.schedule.name).factory(lc.schedule.options) if lc.schedule else None
    return LossTerm(
        label, loss, term_inputs, weight=lc.weight, fusion=fusion, schedule=schedule,
        temperature=getattr(lc.options, "temperature", None),
        takes_labels="labels" in component.inputs, fusion_needs_labels=fusion_needs_labels,
    )


def setup_losses(module: PipelineModule, taps: dict[str, FeatureTaps], sample: torch.Tensor | None, device: torch.device) -> None:
    """Call ``setup(shapes)`` of every loss that has one, with the shapes of its inputs from one
    probe forward of the method; a loss that rejects them is a ``ConfigError`` at its term."""
    needs_shapes = [(i, t) for i, t in enumerate(module.losses) if hasattr(t.loss, "setup")]
    if not needs_shapes:
        return
    if sample is None:
        raise KDToolkitError("losses with setup() need a sample batch to learn their input shapes")
    shapes = probe_shapes(module, taps, sample)
    problems = []
    for i, term in needs_shapes:
        try:
            term.loss.setup({k: input_shapes(v, shapes) for k, v in term.inputs.items()})
        except (ValueError, TypeError) as exc:
            problems.append((f"losses[{i}]", f"loss {term.label!r} cannot take its inputs: {exc}"))
        term.to(device)
    if problems:
        raise ConfigError(problems=problems)


def input_shapes(refs: Ref | list[Ref], shapes: dict[str, Any]) -> Any:
    """The shape (or list of shapes) a loss input will have, flattened like ``LossTerm.forward``
    flattens a list of references whose values are lists."""
    if not isinstance(refs, list):
        return shapes[str(refs)]
    out = []
    for r in refs:
        s = shapes[str(r)]
        out.extend(s if isinstance(s, list) else [s])
    return out


def probe_shapes(module: PipelineModule, taps: dict[str, FeatureTaps], sample: torch.Tensor) -> dict[str, Any]:
    """Shapes by reference text from one eval-mode, gradient-free ``method.forward_outputs(sample)``
    (model logits and published outputs) and the taps it fills, without side
    effects: ``module``'s state (BN statistics, data-initialised quantizer steps) and train/eval
    modes are restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    state = {k: v.clone() for k, v in module.state_dict().items()}
    shapes: dict[str, Any] = {}
    try:
        module.eval()
        with torch.no_grad():
            for text, value in module.method.forward_outputs(sample).items():
                shapes[text] = [v.shape for v in value] if isinstance(value, (list, tuple)) else value.shape
        for name, model_taps in taps.items():
            for path, feat in model_taps.features.items():
                shapes[f"{name}:{path}"] = feat.shape
            model_taps.clear()
    finally:
        module.load_state_dict(state)
        for m, mode in modes.items():
            m.train(mode)
    return shapes


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise KDToolkitError("run.device: cuda requested but no CUDA device is available")
        return torch.device("cuda")
    if setting == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_parts(cfg: PipelineConfig, registry: Registry, *, num_classes: int, device: torch.device, sample: torch.Tensor | None) -> Built:
    """Both steps at once (for tests and benchmarks that bring their own sample batch)."""
    return assemble(cfg, registry, build_networks(cfg, registry, num_classes=num_classes), device=device, sample=sample)
