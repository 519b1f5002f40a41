"""Build a pipeline's parts from a validated config: data, models, taps, loss terms, method,
optimizer. Also the checks that need built models (feature paths), so ``validate`` finds them
before any training starts."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from kdtoolkit.config.schema import LossConfig, PipelineConfig
from kdtoolkit.engine.distributed import dist_info, wrap_model
from kdtoolkit.errors import CheckpointError, ConfigError, KDToolkitError
from kdtoolkit.features import FeatureTaps, resolve_module
from kdtoolkit.losses import OUTPUT_KINDS, STAGES, LossTerm, Ref, default_inputs, output_refs
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


# --- checks before building ----------------------------------------------------------------------


def method_class(cfg: PipelineConfig, registry: Registry):
    return registry.get("method", cfg.method.name).factory


def published_refs(cfg: PipelineConfig, registry: Registry) -> dict[str, str]:
    """Reference text -> kind of the outputs the pipeline's method publishes (``Method.outputs``)."""
    return output_refs(method_class(cfg, registry).outputs(cfg.method.options, cfg))


def effective_losses(cfg: PipelineConfig, registry: Registry) -> list[LossConfig]:
    if cfg.losses:
        return list(cfg.losses)
    defaults = getattr(method_class(cfg, registry), "default_losses", None)
    return [with_loss_options(lc, registry) for lc in defaults(cfg)] if defaults else []


def with_loss_options(lc: LossConfig, registry: Registry) -> LossConfig:
    """A method's default term may give its loss options as a dict (a method does not import other
    plugins' options classes): they become the loss's options object here."""
    if isinstance(lc.options, dict):
        return attrs.evolve(lc, options=registry.get("loss", lc.name).make_options(**lc.options))
    return lc


def loss_labels(losses: list[LossConfig]) -> list[str]:
    labels = [lc.label or lc.name for lc in losses]
    out = []
    for i, label in enumerate(labels):
        out.append(label if labels.count(label) == 1 else f"{label}_{i}")
    return out


def resolved_inputs(lc: LossConfig, loss_cls: Any, cfg: PipelineConfig) -> dict[str, str | list[str]]:
    students = [n for n, s in cfg.models.items() if s.role == "student"]
    teachers = [n for n, s in cfg.models.items() if s.role == "teacher"]
    declared = tuple(getattr(loss_cls, "inputs", ()))
    inputs = default_inputs(declared, students, teachers)
    inputs.update(lc.inputs)
    return inputs


def check_config(cfg: PipelineConfig, registry: Registry) -> list[tuple[str, str]]:
    """Cross-table problems (``(key_path, message)``) that need no built model."""
    problems: list[tuple[str, str]] = []
    method = registry.get("method", cfg.method.name)
    problems += method.factory.check(cfg.method.options, cfg) if hasattr(method.factory, "check") else []
    if not cfg.models:
        problems.append(("models", "at least one model is needed"))
    outputs = method.factory.outputs(cfg.method.options, cfg)
    for out_name, kind in outputs.items():
        if kind not in OUTPUT_KINDS:
            problems.append(("method", f"method {cfg.method.name!r} (plugin {method.plugin!r}) declares output {out_name!r} of unknown kind {kind!r}; kinds: {', '.join(OUTPUT_KINDS)}"))
        if out_name in cfg.models or out_name == "labels" or ":" in out_name or "." in out_name:
            problems.append(("method", f"method {cfg.method.name!r} declares output {out_name!r}, which clashes with a model name, 'labels', or contains ':' or '.'"))
    published = output_refs(outputs)
    for name, spec in cfg.models.items():
        if spec.frozen and not spec.checkpoint:
            problems.append((f"models.{name}.checkpoint", "a frozen model needs pretrained weights: set checkpoint = \"RUN_DIR\" or a .safetensors file"))
        if spec.checkpoint_model and not spec.checkpoint:
            problems.append((f"models.{name}.checkpoint_model", "only meaningful with checkpoint"))
        if name == "labels" or ":" in name or "." in name:
            problems.append((f"models.{name}", "model names cannot be 'labels' or contain ':' or '.'"))
    losses = effective_losses(cfg, registry)
    for i, lc in enumerate(losses):
        path = f"losses[{i}]"
        loss_cls = registry.get("loss", lc.name).factory
        declared = tuple(getattr(loss_cls, "inputs", ()))
        for key in lc.inputs:
            if key not in declared:
                problems.append((f"{path}.inputs.{key}", f"loss {lc.name!r} has no input {key!r}; its inputs: {', '.join(declared)}"))
        inputs = resolved_inputs(lc, loss_cls, cfg)
        for key in declared:
            if key != "labels" and key not in inputs:
                problems.append((f"{path}.inputs", f"input {key!r} of loss {lc.name!r} is not set and has no default here"))
        for key, ref in inputs.items():
            if key not in declared:
                continue
            for text in ref if isinstance(ref, list) else [ref]:
                r = Ref.parse(text)
                if str(r) in published or r.model == "labels" or r.model in cfg.models:
                    continue
                if r.model in outputs:
                    wanted = f"{r.model}:{STAGES}" if outputs[r.model] == STAGES else r.model
                    problems.append((f"{path}.inputs.{key}", f"{text!r}: method output {r.model!r} holds {outputs[r.model]}; refer to it as {wanted!r}"))
                else:
                    known = list(cfg.models) + list(published)
                    problems.append((f"{path}.inputs.{key}", f"unknown model {r.model!r} in {text!r}; models and method outputs: {', '.join(known)}"))
        if lc.fusion is not None and not isinstance(inputs.get("teacher"), list):
            problems.append((f"{path}.fusion", "a fusion needs a list of references as the 'teacher' input"))
    evaluated = [n for n, s in cfg.models.items() if s.evaluate]
    if not evaluated:
        problems.append(("models", "no model has evaluate = true"))
    elif cfg.run.best_metric is not None:
        parts = cfg.run.best_metric.split("/")
        if len(parts) != 3 or parts[0] != "test" or parts[1] not in evaluated or parts[2] not in ("top1", "top5"):
            problems.append(("run.best_metric", f"expected test/<evaluated model>/top1 or top5; evaluated models: {', '.join(evaluated)}"))
    return problems


# --- building ------------------------------------------------------------------------------------


def best_metric(cfg: PipelineConfig) -> str:
    if cfg.run.best_metric:
        return cfg.run.best_metric
    evaluated = [n for n, s in cfg.models.items() if s.evaluate]
    students = [n for n in evaluated if cfg.models[n].role == "student"]
    return f"test/{(students or evaluated)[0]}/top1"


def build_model(cfg: PipelineConfig, registry: Registry, name: str, num_classes: int) -> nn.Module:
    spec = cfg.models[name]
    model = registry.get("model", spec.name).factory(spec.options, num_classes=num_classes)
    if spec.quantizer is not None:
        from kdtoolkit.quant import LayerOverride, quantize_model

        q = spec.quantizer
        quantizer = registry.get("quantizer", q.name).factory(q.options)
        quantize_model(
            model,
            quantizer,
            weight_bits=q.options.weight_bits,
            act_bits=q.options.act_bits,
            keep_first_last=q.keep_first_last,
            overrides=[LayerOverride(o.pattern, o.weight_bits, o.act_bits) for o in q.overrides],
        )
    return model


def expand_ref(ref: Ref, models: dict[str, nn.Module], where: str) -> list[Ref]:
    if ref.feature != STAGES:
        return [ref]
    paths = getattr(models[ref.model], "stage_paths", None)
    if not paths:
        raise ConfigError(problems=[(where, f"model {ref.model!r} has no stages; name its modules instead (e.g. \"{ref.model}:layer1\")")])
    return [Ref(ref.model, p) for p in paths]


def feature_refs(terms_inputs: list[dict[str, Any]], models: dict[str, nn.Module], published: Any = ()) -> tuple[list[dict], list[tuple[str, str]]]:
    """Expand ``:stages`` and check every feature path exists; returns the expanded inputs.
    References in ``published`` (method outputs) are kept as they are."""
    problems: list[tuple[str, str]] = []
    out = []
    for i, inputs in enumerate(terms_inputs):
        expanded: dict[str, Any] = {}
        for key, refs in inputs.items():
            where = f"losses[{i}].inputs.{key}"
            texts = refs if isinstance(refs, list) else [refs]
            parsed: list[Ref] = []
            try:
                for text in texts:
                    r = Ref.parse(text)
                    parsed.extend([r] if str(r) in published else expand_ref(r, models, where))
            except ConfigError as exc:
                problems += exc.problems
                continue
            for r in parsed:
                if r.feature is not None and str(r) not in published:
                    try:
                        resolve_module(models[r.model], r.feature)
                    except ConfigError as exc:
                        problems.append((where, f"model {r.model!r}: {exc}"))
            expanded[key] = parsed if (isinstance(refs, list) or len(parsed) > 1) else parsed[0]
        out.append(expanded)
    return out, problems


@attrs.define
class Built:
    """A built pipeline."""

    config: PipelineConfig
    registry: Registry
    device: torch.device
    module: PipelineModule
    method: Method
    models: dict[str, nn.Module]
    taps: dict[str, FeatureTaps]
    num_classes: int
    data: Any = None


def build_parts(cfg: PipelineConfig, registry: Registry, *, num_classes: int, device: torch.device, sample: torch.Tensor | None) -> Built:
    """Models (quantized, pretrained weights loaded), taps, loss terms and the method.

    ``sample`` is an input batch used once, without gradient and in eval mode, to learn the feature
    shapes that some losses (FitNet) build their parameters from.
    """
    models: dict[str, nn.Module] = {}
    for name, spec in cfg.models.items():
        models[name] = build_model(cfg, registry, name, num_classes)
    losses_cfg = effective_losses(cfg, registry)
    loss_classes = [registry.get("loss", lc.name).factory for lc in losses_cfg]
    inputs = [resolved_inputs(lc, cls, cfg) for lc, cls in zip(losses_cfg, loss_classes)]
    published = published_refs(cfg, registry)
    inputs, problems = feature_refs(inputs, models, published)
    if problems:
        raise ConfigError(problems=problems)

    for name, spec in cfg.models.items():
        if spec.checkpoint:
            load_pretrained(models[name], spec, name)
        if spec.frozen:
            for p in models[name].parameters():
                p.requires_grad_(False)

    paths: dict[str, list[str]] = {name: [] for name in models}
    for term_inputs in inputs:
        for refs in term_inputs.values():
            for r in refs if isinstance(refs, list) else [refs]:
                if str(r) in published or r.model == "labels":
                    continue
                if r.feature is not None and r.feature not in paths[r.model]:
                    paths[r.model].append(r.feature)
    taps = {name: FeatureTaps(models[name], p) for name, p in paths.items() if p}

    terms: list[LossTerm] = []
    for lc, cls, term_inputs, label in zip(losses_cfg, loss_classes, inputs, loss_labels(losses_cfg)):
        loss = cls(lc.options)
        fusion = None
        if lc.fusion is not None:
            n = len(term_inputs["teacher"])
            fusion = registry.get("fusion", lc.fusion.name).factory(lc.fusion.options, num_inputs=n)
        schedule = registry.get("schedule", lc.schedule.name).factory(lc.schedule.options) if lc.schedule else None
        temperature = getattr(lc.options, "temperature", None)
        terms.append(LossTerm(label, loss, term_inputs, weight=lc.weight, fusion=fusion, schedule=schedule, temperature=temperature))

    for model in models.values():
        model.to(device)
    for term in terms:
        term.to(device)
    if sample is not None:
        sample = sample.to(device)
    # Methods run the (possibly DDP-wrapped) models; checkpoints hold the bare ones, so their keys
    # never depend on how many processes trained them.
    info = dist_info()
    running = {name: wrap_model(m, info, device) for name, m in models.items()}
    ctx = MethodContext(models=running, specs=dict(cfg.models), losses=terms, taps=taps, num_classes=num_classes, config=cfg, registry=registry, sample=sample)
    method = registry.get("method", cfg.method.name).factory(cfg.method.options, ctx)
    method.to(device)
    module = PipelineModule(models, terms, method)
    needs_shapes = [t for t in terms if hasattr(t.loss, "setup")]
    if needs_shapes:
        if sample is None:
            raise ValueError("losses with setup() need a sample batch")
        shapes = probe_shapes(module, method.forward_outputs, taps, sample)
        for term in needs_shapes:
            term.loss.setup({k: input_shapes(v, shapes) for k, v in term.inputs.items()})
            term.to(device)
    return Built(cfg, registry, device, module, method, models, taps, num_classes)


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


def probe_shapes(module: nn.Module, forward, taps: dict[str, FeatureTaps], sample: torch.Tensor) -> dict[str, Any]:
    """Shapes by reference text from one eval-mode, gradient-free ``forward(sample)`` (a method's
    ``forward_outputs``: model logits and published outputs) and the taps it fills, without side
    effects: ``module``'s state (BN statistics, data-initialised quantizer steps) and train/eval
    modes are restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    state = {k: v.clone() for k, v in module.state_dict().items()}
    shapes: dict[str, Any] = {}
    try:
        module.eval()
        with torch.no_grad():
            for text, value in forward(sample).items():
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


def resolve_checkpoint_file(location: str) -> Path:
    path = Path(location).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.safetensors", path / "best.safetensors", path / "checkpoints" / "last.safetensors"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: run directory without checkpoints/best.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def load_pretrained(model: nn.Module, spec, name: str) -> None:
    from kdtoolkit.engine.checkpoint import Checkpoint

    ckpt = Checkpoint(resolve_checkpoint_file(spec.checkpoint))
    source = spec.checkpoint_model or ckpt.meta.get("student") or name
    state = ckpt.model_state(source)
    if spec.quantizer is not None:
        from kdtoolkit.quant import load_float_state_dict

        try:
            model.load_state_dict(state)
        except RuntimeError:
            load_float_state_dict(model, state)
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"models.{name}.checkpoint: weights of {source!r} in {ckpt.path} do not fit this model: {str(exc).splitlines()[0]}") from None


def build_optimizer(cfg: PipelineConfig, module: PipelineModule, method: Method) -> torch.optim.Optimizer:
    o = cfg.optimizer
    rules = [(g.params, g.lr_scale, g.weight_decay) for g in o.param_groups]
    for group in method.param_groups():
        if len(group) not in (2, 3):
            raise TypeError(f"{type(method).__name__}.param_groups(): expected (patterns, lr_scale[, weight_decay]), got {group!r}")
        patterns, scale, wd = (*group, None) if len(group) == 2 else group
        rules.append((list(patterns), scale, wd))
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
        raise ConfigError("nothing to train: every model is frozen")
    param_groups = [groups[i] for i in sorted(groups)]
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise KDToolkitError("run.device: cuda requested but no CUDA device is available")
        return torch.device("cuda")
    if setting == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
