"""Options of the ``cmtkd`` method and the checks that need no built network."""

from __future__ import annotations

from typing import Optional

import attrs

from kdtoolkit.api import FieldError, PipelineConfig, non_negative, one_of, positive

__all__ = ["CMTKDOptions", "DEFAULT_GAMMA", "DEFAULT_TERM_OPTIONS", "check"]

#: γ when ``gamma`` is not set, by feature loss
DEFAULT_GAMMA = {"attention": 100.0, "fitnet": 1.0}
#: options that only shape the default loss terms (with ``[[losses]]`` they must stay at their defaults)
DEFAULT_TERM_OPTIONS = ("alpha", "beta", "gamma", "temperature", "feature_loss", "detach_fused_target")


def _stage_indices(instance, attribute, value) -> None:
    if value is None:
        return
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise FieldError(attribute.name, f"must be stage indices >= 0 (0 = the end of the first stage), got {list(value)!r}")
    if len(set(value)) != len(value):
        raise FieldError(attribute.name, f"has duplicates: {list(value)!r}")


def _stage_paths(instance, attribute, value) -> None:
    if value is None:
        return
    if not value:
        raise FieldError(attribute.name, "must list at least one module path (or be left out to use the models' own stages)")
    if len(set(value)) != len(value):
        raise FieldError(attribute.name, f"has duplicates: {list(value)!r}")


def _tuple_or_none(value):
    return None if value is None else tuple(value)


@attrs.frozen
class CMTKDOptions:
    """Options of the ``cmtkd`` method (in the ``[method]`` table).

    ``alpha``, ``beta``, ``gamma``, ``temperature``, ``feature_loss`` and ``detach_fused_target``
    are the paper's Eq. 10 as the *default loss terms* (used when the pipeline lists no
    ``[[losses]]``); with ``[[losses]]`` they must stay at their defaults. The others shape the
    collaborative forward and apply either way.
    """

    #: weight of the default terms ce_student and ce_teacher (Eq. 10's α)
    alpha: float = attrs.field(default=1.0, validator=non_negative)
    #: weight of the default mutual-learning term (Eq. 10's β); 0 = "CMT-KD w/o ML"
    beta: float = attrs.field(default=0.5, validator=non_negative)
    #: weight of the default feature term (Eq. 10's γ); 0 = "CMT-KD w/o Att"; default 100 (attention) or 1 (fitnet)
    gamma: Optional[float] = attrs.field(default=None, validator=attrs.validators.optional(non_negative))
    #: temperature T of the default mutual-learning term
    temperature: float = attrs.field(default=4.0, validator=positive)
    #: loss of the default feature term between the student's stage features and the fused ones (Eq. 4)
    feature_loss: str = attrs.field(default="attention", validator=one_of(("attention", "fitnet")))
    #: stages (0-based, 0 = the end of the first stage) published in ``fused:stages`` and
    #: ``student_features:stages``, so distilled by the feature term; default: all
    feature_stages: Optional[tuple[int, ...]] = attrs.field(default=None, converter=_tuple_or_none, validator=_stage_indices)
    #: learning-rate multiplier of the importance weights π (the paper: 0.1)
    importance_lr_scale: float = attrs.field(default=0.1, validator=positive)
    #: weight decay of the importance factors π (the paper does not say); unset: the optimizer's
    importance_weight_decay: Optional[float] = attrs.field(default=None, validator=attrs.validators.optional(non_negative))
    #: how the teachers' head logits become z_T: "mean" or a learned "importance" fusion
    combine: str = attrs.field(default="mean", validator=one_of(("mean", "importance")))
    #: module paths ending each stage, for models without built-in stages (applies to every network)
    stages: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_tuple_or_none, validator=_stage_paths)
    #: true: the default feature term treats F_k as a fixed target (detach_teacher = true)
    detach_fused_target: bool = False
    #: evaluate the combined teacher (reported as test/combined_teacher/*) beside the student
    evaluate_teachers: bool = True

    @property
    def feature_weight(self) -> float:
        return DEFAULT_GAMMA[self.feature_loss] if self.gamma is None else self.gamma


def check(options: CMTKDOptions, config: PipelineConfig) -> list[tuple[str, str]]:
    """Problems with a CMT-KD pipeline that need no built network, as ``(key_path, message)``."""
    problems: list[tuple[str, str]] = []
    students, teachers = config.students, config.teachers
    if len(students) != 1:
        problems.append(("models", f"method 'cmtkd' needs exactly one model with role = \"student\", found {len(students)}"))
    if not teachers:
        problems.append(("models", "method 'cmtkd' needs at least one model with role = \"teacher\" (e.g. 4-, 6- and 8-bit teachers of the student's architecture)"))
    for name in teachers:
        if config.models[name].frozen:
            problems.append((f"models.{name}.frozen", (
                "CMT-KD trains its teachers together with the student (their features are fused and learn from the "
                "student); remove frozen = true, or use method 'kd' to distil from pretrained, frozen teachers")))
    for name in students:
        if config.models[name].frozen:
            problems.append((f"models.{name}.frozen", "the student of method 'cmtkd' is trained; remove frozen = true"))
    if config.losses:
        defaults = CMTKDOptions()
        for key in DEFAULT_TERM_OPTIONS:
            if getattr(options, key) != getattr(defaults, key):
                problems.append((f"method.{key}", (
                    f"{key} only shapes the default loss terms (Eq. 10); with [[losses]] listed, set the terms' "
                    "weights and options there")))
    if options.feature_stages is not None:
        if not options.feature_stages and not config.losses and (options.gamma is None or options.gamma > 0):
            problems.append(("method.feature_stages", "is empty; to switch the feature loss off set gamma = 0 instead"))
        if options.stages is not None:
            bad = [k for k in options.feature_stages if k >= len(options.stages)]
            if bad:
                problems.append(("method.feature_stages", (
                    f"stage {bad[0]} does not exist: method.stages declares {len(options.stages)} stages "
                    f"(0..{len(options.stages) - 1})")))
    if not config.losses and options.alpha == 0 and options.beta == 0 and options.feature_weight == 0:
        problems.append(("method", "alpha, beta and gamma are all 0: nothing to train"))
    return problems
