"""Training methods: the contract between the engine and a method plugin.

A method is an ``nn.Module`` built by ``factory(options, context)``. The engine calls
``training_step(images, labels, progress)`` inside autocast and gets back a dict of named, already
weighted loss terms; it sums them, back-propagates and steps the optimizer. ``evaluate_logits`` gives
the logits of each evaluated model. Parameters the method owns (e.g. learnable fusion weights) are
saved in checkpoints and optimised under the qualified names ``method.*``.

``LossTermsMethod`` is the common case: forward every model, then evaluate the pipeline's loss terms
on the logits and tapped features. ``supervised``, ``kd`` and ``mutual`` are thin subclasses.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch
from torch import nn

from kdtoolkit.config.schema import LossConfig, ModelConfig, PipelineConfig
from kdtoolkit.features import FeatureTaps
from kdtoolkit.losses import LossTerm, Ref, Value


@attrs.frozen
class Progress:
    """Where training is: ``epoch`` (0-based), ``step`` within it, and the fractional epoch."""

    epoch: int
    step: int
    steps_per_epoch: int
    total_epochs: int

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.step / max(self.steps_per_epoch, 1)


@attrs.define
class MethodContext:
    """What a method is built from: the models as they run (wrapped for DDP when several processes
    train), their configs, the loss terms, the feature taps, and the pipeline."""

    models: dict[str, nn.Module]
    specs: dict[str, ModelConfig]
    losses: list[LossTerm]
    taps: dict[str, FeatureTaps]
    num_classes: int
    config: PipelineConfig
    registry: Any = None
    #: an input batch (on the device) for shape inference; never train on it
    sample: torch.Tensor | None = None

    def students(self) -> list[str]:
        return self.config.students

    def teachers(self) -> list[str]:
        return self.config.teachers


class Method(nn.Module):
    """Base class of training methods: every member the engine calls, with its default.

    Registration refuses a factory that is not a subclass, and a subclass member whose name is a
    near miss of one below (``default_loss``). In the order the engine calls them:

    - ``check(options, config)``, ``outputs(options, config)``, ``extra_models(options, config)``,
      ``default_losses(options, config)``: class methods, before any model is built;
    - ``check_models(options, config, models)``: pure, on the built models; then
      ``prepare_models(options, config, models)``: the one step that may change them;
    - ``Method(options, context)``; ``param_groups()``;
    - each step ``training_step(images, labels, progress)``; each epoch ``epoch_metrics()``;
      each evaluation ``evaluate_logits(images)``.
    """

    def __init__(self, options, context: MethodContext):
        super().__init__()
        self.options = options
        # plain dicts: the models are registered under the pipeline's ``models``, not here
        self._models = dict(context.models)
        self._specs = dict(context.specs)
        self._taps = dict(context.taps)
        self._losses = list(context.losses)

    # -- before any model is built (class methods) --
    @classmethod
    def check(cls, options, config: PipelineConfig) -> list[tuple[str, str]]:
        """Problems with the pipeline for this method, as ``(key_path, message)``."""
        return []

    @classmethod
    def outputs(cls, options, config: PipelineConfig) -> dict[str, str]:
        """Named tensors this method publishes beside the models' logits, as ``name -> kind``
        (``"logits"``, ``"features"`` or ``"stages"``). Loss-term inputs refer to them like model
        outputs: ``"name"`` for logits and features, ``"name:stages"`` for a list of stage features.
        ``forward_outputs`` must return each under that reference text."""
        return {}

    @classmethod
    def extra_models(cls, options, config: PipelineConfig) -> dict[str, ModelConfig]:
        """Networks the method adds to ``[models]`` (e.g. a peer network): ``name -> ModelConfig``.
        They are built, quantized, loaded, referenced by losses, evaluated and exported exactly like
        the pipeline's own models."""
        return {}

    @classmethod
    def default_losses(cls, options, config: PipelineConfig) -> list[LossConfig]:
        """The loss terms used when the pipeline lists no ``[[losses]]``."""
        return []

    # -- on the built models --
    @classmethod
    def check_models(cls, options, config: PipelineConfig, models: dict[str, nn.Module]) -> list[tuple[str, str]]:
        """Problems that need the built (float or quantized, untrained) models, e.g. stage splits.
        Pure: it must not change the models (that is ``prepare_models``)."""
        return []

    @classmethod
    def prepare_models(cls, options, config: PipelineConfig, models: dict[str, nn.Module]) -> None:
        """Change the built models before taps, loss terms and the method are made (after the
        pretrained weights are loaded), e.g. tie parameters; runs once, after ``check_models``."""

    # -- the built method --
    def param_groups(self) -> list[tuple]:
        """Default parameter groups, each ``(fnmatch patterns, lr_scale)`` or ``(fnmatch patterns,
        lr_scale, weight_decay)`` (``None``: the optimizer's), on qualified names (``method.*``,
        ``models.<name>.*``, ``losses.<i>.*``). The pipeline's ``[[optimizer.param_groups]]`` come
        first: the first matching group wins."""
        return []

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, progress: Progress) -> dict[str, torch.Tensor]:
        """The named, already weighted loss terms of one batch (inside autocast); the engine sums them."""
        raise NotImplementedError(f"{type(self).__name__} does not define training_step(images, labels, progress)")

    def forward_outputs(self, images: torch.Tensor) -> dict[str, Value]:
        """Every model's logits (keyed by model name; frozen models without gradient), plus the
        outputs declared by ``outputs``, keyed by their reference text (``"fused:stages"``)."""
        logits = {}
        for name, model in self._models.items():
            if self._specs[name].frozen:
                with torch.no_grad():
                    logits[name] = model(images)
            else:
                logits[name] = model(images)
        return logits

    def evaluate_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every model with ``evaluate = true`` (name -> logits; metrics ``test/<name>/top1``)."""
        return {name: self._models[name](images) for name, spec in self._specs.items() if spec.evaluate}

    def epoch_metrics(self) -> dict[str, float]:
        """Extra values for the epoch's metrics row (e.g. learned fusion weights)."""
        return {}

    def train(self, mode: bool = True):
        super().train(mode)
        for name, model in self._models.items():
            model.train(mode and not self._specs[name].frozen)
        return self


class LossTermsMethod(Method):
    """Run ``forward_outputs`` (every model, plus what a subclass publishes), then evaluate the loss terms."""

    def loss_terms(self, outputs: Mapping[str, Value], labels: torch.Tensor, progress: Progress) -> dict[str, torch.Tensor]:
        """The weighted terms. A reference is looked up in ``outputs`` first (by its text: a
        model's logits or a published output), then among the labels and the tapped features."""

        def value(ref: Ref) -> Value:
            text = str(ref)
            if text in outputs:
                return outputs[text]
            if ref.model == "labels":
                return labels
            return self._taps[ref.model].features[ref.feature]

        return {term.label: term(value, labels, progress.epoch_float, progress.total_epochs) for term in self._losses}

    def training_step(self, images, labels, progress):
        return self.loss_terms(self.forward_outputs(images), labels, progress)
