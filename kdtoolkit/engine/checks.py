"""Every check of a pipeline's config against the registry, in one pass (``check_config``), and the
checks that need the built models (``check_built``): loss inputs and references, feature paths,
method outputs, required components, the run directory's name, the method's own checks.

Nothing here builds anything; ``kdtoolkit.engine.assemble`` calls these and builds.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from kdtoolkit.config.schema import LossConfig, ModelConfig, PipelineConfig
from kdtoolkit.errors import ConfigError
from kdtoolkit.features import resolve_module
from kdtoolkit.losses import OUTPUT_KINDS, STAGES, Ref, default_inputs, output_refs
from kdtoolkit.plugins import Component, Registry

Problems = list[tuple[str, str]]


def method_component(cfg: PipelineConfig, registry: Registry) -> Component:
    return registry.get("method", cfg.method.name)


def with_extra_models(cfg: PipelineConfig, registry: Registry) -> tuple[PipelineConfig, Problems]:
    """``cfg`` with the networks the method adds (``Method.extra_models``) in ``models``, and the
    problems with them (a name taken by ``[models]``, an unknown model plugin)."""
    method = method_component(cfg, registry)
    extra = method.factory.extra_models(cfg.method.options, cfg)
    if not extra:
        return cfg, []
    problems: Problems = []
    models = dict(cfg.models)
    for name, spec in extra.items():
        where = f"method (model {name!r} added by method {cfg.method.name!r})"
        if not isinstance(spec, ModelConfig):
            problems.append((where, f"extra_models() must give ModelConfig values, got {type(spec).__name__}"))
        elif name in models:
            problems.append((f"models.{name}", f"method {cfg.method.name!r} adds a model of this name; rename the model"))
        elif ("model", spec.name) not in registry:
            problems.append((where, f"unknown model {spec.name!r}; installed: {', '.join(registry.names('model'))}"))
        else:
            models[name] = spec
    return attrs.evolve(cfg, models=models), problems


def effective_losses(cfg: PipelineConfig, registry: Registry) -> list[LossConfig]:
    """The pipeline's ``[[losses]]``, or the method's ``default_losses`` when it lists none."""
    if cfg.losses:
        return list(cfg.losses)
    defaults = method_component(cfg, registry).factory.default_losses(cfg.method.options, cfg)
    return [with_loss_options(lc, registry) for lc in defaults]


def with_loss_options(lc: LossConfig, registry: Registry) -> LossConfig:
    """A method's default term may give its loss options as a dict (a method does not import other
    plugins' options classes): they become the loss's options object here."""
    if isinstance(lc.options, dict) and ("loss", lc.name) in registry:
        return attrs.evolve(lc, options=registry.get("loss", lc.name).make_options(**lc.options))
    return lc


def loss_labels(losses: list[LossConfig]) -> list[str]:
    labels = [lc.label or lc.name for lc in losses]
    return [label if labels.count(label) == 1 else f"{label}_{i}" for i, label in enumerate(labels)]


def resolved_inputs(lc: LossConfig, declared: tuple[str, ...], cfg: PipelineConfig) -> dict[str, str | list[str]]:
    """A term's inputs: the defaults for ``declared`` (from the roles), then the term's own."""
    inputs = default_inputs(declared, cfg.students, cfg.teachers)
    inputs.update(lc.inputs)
    return inputs


def published_refs(cfg: PipelineConfig, registry: Registry) -> dict[str, str]:
    """Reference text -> kind of the outputs the pipeline's method publishes (``Method.outputs``)."""
    return output_refs(method_component(cfg, registry).factory.outputs(cfg.method.options, cfg))


def best_metric(cfg: PipelineConfig) -> str:
    if cfg.run.best_metric:
        return cfg.run.best_metric
    evaluated = cfg.evaluated
    students = [n for n in evaluated if cfg.models[n].role == "student"]
    return f"test/{(students or evaluated)[0]}/top1"


def check_config(cfg: PipelineConfig, registry: Registry, *, blocked: tuple[str, ...] = ()) -> Problems:
    """Cross-table problems (``(key_path, message)``) that need no built model. ``cfg`` already
    holds the method's extra models (``with_extra_models``)."""
    method = method_component(cfg, registry)
    problems: Problems = list(method.factory.check(cfg.method.options, cfg))
    if not cfg.models:
        problems.append(("models", "at least one model is needed"))
    for name, spec in cfg.models.items():
        if spec.frozen and not spec.checkpoint:
            problems.append((f"models.{name}.checkpoint", "a frozen model needs pretrained weights: set checkpoint = \"RUN_DIR\" or a .safetensors file"))
        if spec.checkpoint_model and not spec.checkpoint:
            problems.append((f"models.{name}.checkpoint_model", "only meaningful with checkpoint"))
        if name == "labels" or ":" in name or "." in name:
            problems.append((f"models.{name}", "model names cannot be 'labels' or contain ':' or '.'"))
    outputs = method.factory.outputs(cfg.method.options, cfg)
    for out_name, kind in outputs.items():
        if kind not in OUTPUT_KINDS:
            problems.append(("method", f"method {cfg.method.name!r} (plugin {method.plugin!r}) declares output {out_name!r} of unknown kind {kind!r}; kinds: {', '.join(OUTPUT_KINDS)}"))
        if out_name in cfg.models or out_name == "labels" or ":" in out_name or "." in out_name:
            problems.append(("method", f"method {cfg.method.name!r} declares output {out_name!r}, which clashes with a model name, 'labels', or contains ':' or '.'"))
    problems += _check_losses(cfg, registry, outputs)
    problems += _check_requires(cfg, registry, blocked)
    evaluated = cfg.evaluated
    if not evaluated:
        problems.append(("models", "no model has evaluate = true"))
    elif cfg.run.best_metric is not None:
        parts = cfg.run.best_metric.split("/")
        if len(parts) != 3 or parts[0] != "test" or parts[1] not in evaluated or parts[2] not in ("top1", "top5"):
            problems.append(("run.best_metric", f"expected test/<evaluated model>/top1 or top5; evaluated models: {', '.join(evaluated)}"))
    problems += _check_output_dir(cfg)
    return problems


def _check_losses(cfg: PipelineConfig, registry: Registry, outputs: dict[str, str]) -> Problems:
    problems: Problems = []
    published = output_refs(outputs)
    for i, lc in enumerate(effective_losses(cfg, registry)):
        path = f"losses[{i}]"
        component = registry.get("loss", lc.name)
        declared = component.inputs
        for key in lc.inputs:
            if key not in declared:
                problems.append((f"{path}.inputs.{key}", f"loss {lc.name!r} has no input {key!r}; its inputs: {', '.join(declared)}"))
        inputs = resolved_inputs(lc, declared, cfg)
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
    return problems


def used_components(cfg: PipelineConfig, registry: Registry) -> list[tuple[str, str, str]]:
    """``(key_path, kind, name)`` of every component the pipeline uses."""
    used = [("data.name", "dataset", cfg.data.name), ("method.name", "method", cfg.method.name)]
    for name, spec in cfg.models.items():
        used.append((f"models.{name}.name", "model", spec.name))
        if spec.quantizer is not None:
            used.append((f"models.{name}.quantizer.name", "quantizer", spec.quantizer.name))
    if cfg.optimizer.schedule is not None:
        used.append(("optimizer.schedule.name", "schedule", cfg.optimizer.schedule.name))
    for i, lc in enumerate(effective_losses(cfg, registry)):
        used.append((f"losses[{i}].name", "loss", lc.name))
        if lc.fusion is not None:
            used.append((f"losses[{i}].fusion.name", "fusion", lc.fusion.name))
        if lc.schedule is not None:
            used.append((f"losses[{i}].schedule.name", "schedule", lc.schedule.name))
    return used


def _check_requires(cfg: PipelineConfig, registry: Registry, blocked: tuple[str, ...]) -> Problems:
    """Components the used components declare they need (``register(..., requires=...)``)."""
    problems: Problems = []
    for path, kind, name in used_components(cfg, registry):
        if (kind, name) not in registry:
            continue  # reported where the name is structured
        component = registry.get(kind, name)
        for other_kind, names in component.requires.items():
            for other in names:
                if (other_kind, other) not in registry:
                    hint = f"; blocked plugins: {', '.join(blocked)}" if blocked else ""
                    problems.append((path, (
                        f"{kind} {name!r} (plugin {component.plugin!r}) needs {other_kind} {other!r}, which no loaded "
                        f"plugin provides{hint}")))
    return problems


def _check_output_dir(cfg: PipelineConfig) -> Problems:
    try:
        cfg.run.output_dir.format(name=cfg.run.name)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return [("run.output_dir", f"bad format string {cfg.run.output_dir!r} ({type(exc).__name__}: {exc}); only {{name}} is replaced")]
    return []


# --- checks of the built models ------------------------------------------------------------------


def expand_ref(ref: Ref, models: dict[str, nn.Module], where: str) -> list[Ref]:
    if ref.feature != STAGES:
        return [ref]
    paths = getattr(models[ref.model], "stage_paths", None)
    if not paths:
        raise ConfigError(problems=[(where, f"model {ref.model!r} has no stages; name its modules instead (e.g. \"{ref.model}:layer1\")")])
    return [Ref(ref.model, p) for p in paths]


def feature_refs(terms_inputs: list[dict[str, Any]], models: dict[str, nn.Module], published: Any = ()) -> tuple[list[dict], Problems]:
    """Expand ``:stages`` and check every feature path exists; returns the expanded inputs.
    References in ``published`` (method outputs) are kept as they are."""
    problems: Problems = []
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
