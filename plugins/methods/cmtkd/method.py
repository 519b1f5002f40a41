"""CMT-KD: collaborative multi-teacher knowledge distillation for low bit-width students.

Pham, Hoang, Do, "Collaborative Multi-Teacher Knowledge Distillation for Learning Low Bit-width Deep
Neural Networks", WACV 2023 (arXiv:2210.16103). See ``METHODS.md`` ("CMT-KD") for how the paper's
ambiguities are resolved.

One ``role = "student"`` network and N >= 1 ``role = "teacher"`` networks of the same architecture,
each with its own quantizer (e.g. 4/6/8-bit teachers for a W2A2 student), all trained together::

    stage k of teacher i:   A_k^i = teacher_i.forward_stage(k, F_{k-1})        (F_{-1} = images)
    fusion (Eq. 1):         F_k   = Σ_i softmax(π_k)_i · A_k^i                (input of stage k+1 of every teacher)
    combined teacher:       z_T   = mean_i head_i(F_{K-1})                    (combine = "mean")
    student:                z_S, with its stage outputs S_k
    feature loss (Eq. 4):   L_feat = Σ_{k in feature_stages} d(S_k, F_k)      (attention, or FitNet)
    mutual learning (7-9):  p = sg(softmax(minlogit(z_T, z_S) / T));  KL_S = T²·KL(p ‖ p_S), KL_T = T²·KL(p ‖ p_T)
    total (Eq. 10):         L = α(CE_S + CE_T) + β(KL_S + KL_T) + γ·L_feat

``training_step`` returns ``ce_student``, ``ce_teacher``, ``kl_student``, ``kl_teacher`` and
``feature`` (already weighted; a term whose weight is 0 is not computed and returned as 0).

Design decisions (each an option where the paper leaves room):

- **Stage-by-stage execution.** Hooks cannot feed the fused feature to the next stage, so every
  network runs through ``forward_stage`` (``kdtoolkit.models.StagedModel``). Built-in models have
  their stages (the paper's fusion points); any other model is split from declared module paths
  (``stages = [...]``, :func:`.staging.staged_from_paths`, torch.fx). The student runs stage
  by stage too, which gives its stage features without hooks.
- **Fusion.** One ``importance`` fusion plugin per stage (its π are this method's parameters,
  ``method.fusion.<k>.importance``, at ``importance_lr_scale`` × the learning rate, 0.1 as in the paper;
  their weight decay is the optimizer's unless ``importance_weight_decay`` is set: the paper does not say).
- **Gradient through F_k** (``detach_fused_target = false``, the default): the feature loss trains
  the student *and* the teachers and π through F_k, as the paper states ("the model weights of
  teachers, student and the importance factors ... are updated by minimizing L"; the importance
  factors are learned "to produce a suitable shared knowledge that the student can effectively
  mimic"). ``true`` makes F_k a fixed target of the student's feature loss (classic one-way
  distillation; π then learn from CE_T and KL_T only).
- **Combined teacher.** The paper's "combined teacher" classifies with the teachers' heads applied to
  the last shared feature; the rule that merges the heads is not published. ``combine = "mean"``
  (default) averages their logits; ``"importance"`` learns one more importance fusion over the head
  logits (``method.combine_fusion.importance``, also at ``importance_lr_scale``). ``CE_T`` and
  ``KL_T`` are computed on ``z_T``; its accuracy is reported as ``test/combined_teacher/top1``.
- **γ.** 100 with attention transfer (METHODS.md). The FitNet weight is given in the paper as a
  second value whose digits are not in our copy of the text; ``gamma`` defaults to 1 with
  ``feature_loss = "fitnet"`` (an MSE on BN-scale features is ~10^3 times an attention-map loss), and
  can be set explicitly.
- **Temperature.** Not published; 4 (the KDCL-MinLogit convention of the ``minlogit`` loss).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.config.validators import FieldError, non_negative, one_of, positive
from kdtoolkit.errors import ConfigError
from kdtoolkit.methods import Method, MethodContext, Progress
from kdtoolkit_plugins.methods.cmtkd.staging import as_staged

__all__ = ["CMTKD", "CMTKDOptions", "COMBINED", "DEFAULT_GAMMA"]

#: key of the combined teacher in ``evaluate_logits`` (and so in the metrics: test/combined_teacher/top1)
COMBINED = "combined_teacher"
#: γ when ``gamma`` is not set, by feature loss
DEFAULT_GAMMA = {"attention": 100.0, "fitnet": 1.0}
TERMS = ("ce_student", "ce_teacher", "kl_student", "kl_teacher", "feature")


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
    """Options of the ``cmtkd`` method (in the ``[method]`` table)."""

    #: weight of the cross-entropy terms CE_S + CE_T (Eq. 10)
    alpha: float = attrs.field(default=1.0, validator=non_negative)
    #: weight of the mutual-learning terms KL_S + KL_T (Eq. 10); 0 = "CMT-KD w/o ML"
    beta: float = attrs.field(default=0.5, validator=non_negative)
    #: weight of the feature loss (Eq. 10); 0 = "CMT-KD w/o Att"; default 100 (attention) or 1 (fitnet)
    gamma: Optional[float] = attrs.field(default=None, validator=non_negative)
    #: temperature T of the mutual-learning terms
    temperature: float = attrs.field(default=4.0, validator=positive)
    #: distance between the student's stage features and the fused teacher features (Eq. 4)
    feature_loss: str = attrs.field(default="attention", validator=one_of(("attention", "fitnet")))
    #: stages (0-based, 0 = the end of the first stage) whose features are distilled; default: all
    feature_stages: Optional[tuple[int, ...]] = attrs.field(default=None, converter=_tuple_or_none, validator=_stage_indices)
    #: learning-rate multiplier of the importance weights π (the paper: 0.1)
    importance_lr_scale: float = attrs.field(default=0.1, validator=positive)
    #: weight decay of the importance factors π (the paper does not say); unset: the optimizer's
    importance_weight_decay: Optional[float] = attrs.field(default=None, validator=attrs.validators.optional(non_negative))
    #: how the teachers' head logits become z_T: "mean" or a learned "importance" fusion
    combine: str = attrs.field(default="mean", validator=one_of(("mean", "importance")))
    #: module paths ending each stage, for models without built-in stages (applies to every network)
    stages: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_tuple_or_none, validator=_stage_paths)
    #: true: F_k is a fixed target of the feature loss (no gradient to teachers and π through it)
    detach_fused_target: bool = False
    #: evaluate the combined teacher (reported as test/combined_teacher/*) beside the student
    evaluate_teachers: bool = True

    @property
    def feature_weight(self) -> float:
        return DEFAULT_GAMMA[self.feature_loss] if self.gamma is None else self.gamma


class CMTKD(Method):
    """The ``cmtkd`` method: see the module docstring."""

    def __init__(self, options: CMTKDOptions | None, context: MethodContext):
        options = options or CMTKDOptions()
        super().__init__(options, context)
        problems = self.check(options, context.config)
        if problems:
            raise ConfigError(problems=problems)
        registry = context.registry
        if registry is None:
            raise ValueError("cmtkd needs context.registry (the fusion and loss plugins are built through it)")
        self.student_name = context.students()[0]
        self.teacher_names = context.teachers()
        problems = self.check_models(options, context.config, context.models)
        if problems:
            raise ConfigError(problems=problems)
        self.num_stages = len(context.models[self.student_name].stage_paths)
        stages = tuple(range(self.num_stages)) if options.feature_stages is None else options.feature_stages
        self.feature_stages = tuple(sorted(stages))

        n = len(self.teacher_names)
        importance = registry.get("fusion", "importance")
        self.fusion = nn.ModuleList(importance.factory(importance.make_options(), num_inputs=n) for _ in range(self.num_stages))
        self.combine_fusion = importance.factory(importance.make_options(), num_inputs=n) if options.combine == "importance" else None

        self.alpha, self.beta, self.gamma = options.alpha, options.beta, options.feature_weight
        minlogit = registry.get("loss", "minlogit")
        self.mutual_loss = minlogit.factory(minlogit.make_options(temperature=options.temperature))
        self.feature_loss = None
        if self.gamma > 0 and self.feature_stages:
            comp = registry.get("loss", options.feature_loss)
            self.feature_loss = comp.factory(comp.make_options(detach_teacher=options.detach_fused_target))
            if hasattr(self.feature_loss, "setup"):
                if context.sample is None:
                    if options.feature_loss == "fitnet":
                        raise ValueError("cmtkd with feature_loss = 'fitnet' needs context.sample to build the regressors")
                else:
                    self.feature_loss.setup(self._feature_shapes(context.sample))

    # -- the forward passes ------------------------------------------------------------------------
    def _student(self) -> nn.Module:
        return self._models[self.student_name]

    def _teachers(self) -> list[nn.Module]:
        return [self._models[n] for n in self.teacher_names]

    def student_forward(self, images: torch.Tensor, features: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(z_S, [S_k for every stage])`` (stage features only when ``features``)."""
        student = self._student()
        if not features:
            return student(images), []
        feats = []
        x = images
        for k in range(self.num_stages):
            x = student.forward_stage(k, x)
            feats.append(x)
        return student.forward_stage(self.num_stages, x), feats

    def teachers_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(z_T, [F_k for every stage], [head logits of each teacher])``: the collaborative pass."""
        teachers = self._teachers()
        fused = []
        h = images
        for k in range(self.num_stages):
            h = self.fusion[k]([t.forward_stage(k, h) for t in teachers])
            fused.append(h)
        heads = [t.forward_stage(self.num_stages, h) for t in teachers]
        if self.combine_fusion is not None:
            z_t = self.combine_fusion(heads)
        elif len(heads) == 1:
            z_t = heads[0]
        else:
            z_t = torch.stack(heads).mean(dim=0)
        return z_t, fused, heads

    # -- what the engine calls ---------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, labels: torch.Tensor, progress: Progress) -> dict[str, torch.Tensor]:
        use_features = self.feature_loss is not None
        z_t, fused, _ = self.teachers_forward(images)
        z_s, feats = self.student_forward(images, use_features)
        zero = z_s.new_zeros(()).float()
        out = dict.fromkeys(TERMS, zero)
        if self.alpha > 0:
            out["ce_student"] = self.alpha * F.cross_entropy(z_s, labels)
            out["ce_teacher"] = self.alpha * F.cross_entropy(z_t, labels)
        if self.beta > 0:
            kl_t, kl_s = self.mutual_loss.per_network([z_t, z_s], labels)
            out["kl_student"] = self.beta * kl_s
            out["kl_teacher"] = self.beta * kl_t
        if use_features:
            ks = self.feature_stages
            out["feature"] = self.gamma * self.feature_loss(student=[feats[k] for k in ks], teacher=[fused[k] for k in ks])
        return out

    def evaluate_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self._specs[self.student_name].evaluate:
            out[self.student_name] = self._student()(images)
        if self.options.evaluate_teachers:
            out[COMBINED] = self.teachers_forward(images)[0]
        return out

    def param_groups(self) -> list[tuple[list[str], float]]:
        o = self.options
        return [(["method.fusion.*", "method.combine_fusion.*"], o.importance_lr_scale, o.importance_weight_decay)]

    def importance_weights(self) -> dict[str, torch.Tensor]:
        """``softmax(π)`` of every fusion (detached): ``"stage<k>"`` and, with combine = "importance", ``"logits"``."""
        out = {f"stage{k}": f.weights() for k, f in enumerate(self.fusion)}
        if self.combine_fusion is not None:
            out["logits"] = self.combine_fusion.weights()
        return out

    def epoch_metrics(self) -> dict[str, float]:
        """``fusion/stage<k>/<teacher> -> softmax(π_k)`` (and ``fusion/logits/<teacher>``), for Figure 2."""
        out = {}
        for where, weights in self.importance_weights().items():
            for name, w in zip(self.teacher_names, weights.tolist()):
                out[f"fusion/{where}/{name}"] = w
        return out

    # -- construction helpers ----------------------------------------------------------------------
    @torch.no_grad()
    def _feature_shapes(self, sample: torch.Tensor) -> dict[str, list[torch.Size]]:
        """Shapes of the paired features, from one no-grad eval-mode pass over ``sample``. The
        networks' state (BN statistics, quantizer initialisation flags) is restored afterwards."""
        nets = [self._student(), *self._teachers()]
        states = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
        modes = [{n: m.training for n, m in net.named_modules()} for net in nets]
        try:
            for net in nets:
                net.eval()
            _, fused, _ = self.teachers_forward(sample)
            _, feats = self.student_forward(sample, True)
        finally:
            for net, state, mode in zip(nets, states, modes):
                net.load_state_dict(state)
                for n, m in net.named_modules():
                    m.training = mode[n]
        ks = self.feature_stages
        return {"student": [feats[k].shape for k in ks], "teacher": [fused[k].shape for k in ks]}

    @classmethod
    def check_models(cls, options, config, models: dict[str, nn.Module]) -> list[tuple[str, str]]:
        """Problems that need the built networks (each network becomes staged here: built-in
        stages, or split at ``options.stages``): stage counts and ``feature_stages``."""
        options = options or CMTKDOptions()
        names = [n for n, s in config.models.items() if s.role == "student"][:1] + [n for n, s in config.models.items() if s.role == "teacher"]
        try:
            for name in names:
                as_staged(models[name], options.stages, name=name)
        except ConfigError as exc:
            return list(exc.problems)
        counts = {name: len(models[name].stage_paths) for name in names}
        if len(set(counts.values())) != 1:
            return [("models", "every network of CMT-KD needs the same number of stages, got "
                     + ", ".join(f"{n}: {c}" for n, c in counts.items()))]
        k = next(iter(counts.values()))
        bad = [s for s in (options.feature_stages or ()) if s >= k]
        if bad:
            return [("method.feature_stages", (
                f"stage {bad[0]} does not exist: the networks have {k} stages (0..{k - 1}, "
                f"ending at {', '.join(models[names[0]].stage_paths)})"))]
        return []

    # -- checks before any model is built ----------------------------------------------------------
    @classmethod
    def check(cls, options, config) -> list[tuple[str, str]]:
        options = options or CMTKDOptions()
        problems: list[tuple[str, str]] = []
        students = [n for n, s in config.models.items() if s.role == "student"]
        teachers = [n for n, s in config.models.items() if s.role == "teacher"]
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
        if COMBINED in config.models:
            problems.append((f"models.{COMBINED}", f"the name {COMBINED!r} is used by method 'cmtkd' for the combined teacher's metrics; rename the model"))
        if config.losses:
            problems.append(("losses", (
                "method 'cmtkd' computes its own loss (Eq. 10 of the paper): remove [[losses]] and set the weights in "
                "[method]: alpha (cross-entropy), beta (mutual learning), gamma (feature loss)")))
        if options.feature_stages is not None:
            if not options.feature_stages and (options.gamma is None or options.gamma > 0):
                problems.append(("method.feature_stages", "is empty; to switch the feature loss off set gamma = 0 instead"))
            if options.stages is not None:
                bad = [k for k in options.feature_stages if k >= len(options.stages)]
                if bad:
                    problems.append(("method.feature_stages", (
                        f"stage {bad[0]} does not exist: method.stages declares {len(options.stages)} stages "
                        f"(0..{len(options.stages) - 1})")))
        if options.alpha == 0 and options.beta == 0 and options.feature_weight == 0:
            problems.append(("method", "alpha, beta and gamma are all 0: nothing to train"))
        return problems
