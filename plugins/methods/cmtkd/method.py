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

**What the forward publishes.** The collaborative forward (``forward_outputs``) produces named
tensors that loss terms refer to like any model output (``Method.outputs``):

- ``"combined_teacher"``: z_T (also evaluated: ``test/combined_teacher/top1``);
- ``"fused:stages"``: [F_k for k in ``feature_stages``] (default: every stage);
- ``"student_features:stages"``: [S_k for the same k];
- ``"<student>"``: z_S, and ``"<teacher>"``: that teacher's head on the last fused feature F_{K-1}.

**The losses are ordinary ``[[losses]]``.** Without ``[[losses]]`` the method's default terms are
Eq. 10, weighted by the ``[method]`` options α, β, γ (their documented defaults 1, 0.5, 100):

| label | loss | inputs | weight |
|---|---|---|---|
| ``ce_student`` | ``ce`` | ``<student>`` | α |
| ``ce_teacher`` | ``ce`` | ``combined_teacher`` | α |
| ``mutual`` | ``minlogit`` (T = ``temperature``) | ``[combined_teacher, <student>]`` | β (= β·(KL_T + KL_S)) |
| ``feature`` | ``attention`` or ``fitnet`` (``feature_loss``), ``detach_teacher = detach_fused_target`` | ``student_features:stages`` vs ``fused:stages`` | γ |

A term whose weight is 0 is left out. Listing ``[[losses]]`` replaces the defaults (reweight,
schedule, add or swap terms as with any method); the default terms' options must then stay unset.
Note that the ``attention`` and ``fitnet`` losses detach their ``teacher`` input by default: write
``detach_teacher = false`` to let the feature loss train the teachers and π as the paper does.

Design decisions (each an option where the paper leaves room):

- **Stage-by-stage execution.** Hooks cannot feed the fused feature to the next stage, so every
  network runs through ``forward_stage`` (``kdtoolkit.models.StagedModel``). Built-in models have
  their stages (the paper's fusion points); any other model is split from declared module paths
  (``stages = [...]``, :func:`.staging.staged_from_paths`, torch.fx). The student runs stage by
  stage too, which gives its stage features without hooks.
- **Fusion.** One ``importance`` fusion plugin per stage (its π are this method's parameters,
  ``method.fusion.<k>.importance``, at ``importance_lr_scale`` × the learning rate, 0.1 as in the paper;
  their weight decay is the optimizer's unless ``importance_weight_decay`` is set: the paper does not say).
- **Gradient through F_k** (``detach_fused_target = false``, the default): the feature loss trains
  the student *and* the teachers and π through F_k, as the paper states ("the model weights of
  teachers, student and the importance factors ... are updated by minimizing L"). ``true`` makes F_k
  a fixed target of the student's feature loss (π then learn from CE_T and KL_T only).
- **Combined teacher.** The rule that merges the teachers' heads is not published. ``combine =
  "mean"`` (default) averages their logits; ``"importance"`` learns one more importance fusion over
  the head logits (``method.combine_fusion.importance``, also at ``importance_lr_scale``).
- **γ.** 100 with attention transfer (METHODS.md); 1 with ``feature_loss = "fitnet"`` (the paper's
  FitNet value is not in our copy of the text; an MSE on BN-scale features is ~10^3 times an
  attention-map loss).
- **Temperature.** Not published; 4 (the KDCL-MinLogit convention of the ``minlogit`` loss).
"""

from __future__ import annotations

import torch
from torch import nn

from kdtoolkit.api import ConfigError, LossConfig, LossTermsMethod, MethodContext
from kdtoolkit_plugins.methods.cmtkd.options import CMTKDOptions, check
from kdtoolkit_plugins.methods.cmtkd.staging import as_staged, is_staged, stage_paths_of

__all__ = ["CMTKD", "COMBINED", "FUSED", "OUTPUTS", "STUDENT_FEATURES"]

#: the combined teacher's logits (a published output, evaluated as test/combined_teacher/*)
COMBINED = "combined_teacher"
#: the fused teacher features F_k (published as "fused:stages")
FUSED = "fused"
#: the student's stage features S_k at the same stages (published as "student_features:stages")
STUDENT_FEATURES = "student_features"
#: what ``forward_outputs`` publishes beside the models' logits
OUTPUTS = {COMBINED: "logits", FUSED: "stages", STUDENT_FEATURES: "stages"}


class CMTKD(LossTermsMethod):
    """The ``cmtkd`` method: see the module docstring."""

    def __init__(self, options: CMTKDOptions | None, context: MethodContext):
        options = options or CMTKDOptions()
        super().__init__(options, context)
        problems = check(options, context.config)
        if problems:
            raise ConfigError(problems=problems)
        registry = context.registry
        if registry is None:
            raise ValueError("cmtkd needs context.registry (its importance fusions are built through it)")
        self.student_name, self.teacher_names = context.config.students[0], context.config.teachers
        unstaged = [n for n in (self.student_name, *self.teacher_names) if not is_staged(context.models[n])]
        if unstaged:
            raise ValueError(f"cmtkd: networks {unstaged} are not staged; build them through the engine (prepare_models stages them)")
        self.num_stages = len(context.models[self.student_name].stage_paths)
        stages = tuple(range(self.num_stages)) if options.feature_stages is None else options.feature_stages
        self.feature_stages = tuple(sorted(stages))

        n = len(self.teacher_names)
        importance = registry.get("fusion", "importance")
        self.fusion = nn.ModuleList(importance.factory(importance.make_options(), num_inputs=n) for _ in range(self.num_stages))
        self.combine_fusion = importance.factory(importance.make_options(), num_inputs=n) if options.combine == "importance" else None

    # -- the forward passes ------------------------------------------------------------------------
    def _student(self) -> nn.Module:
        return self._models[self.student_name]

    def _teachers(self) -> list[nn.Module]:
        return [self._models[n] for n in self.teacher_names]

    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(z_S, [S_k for every stage])``: the student run stage by stage."""
        student = self._student()
        feats = []
        x = images
        for k in range(self.num_stages):
            x = student.forward_stage(k, x)
            feats.append(x)
        return student.forward_stage(self.num_stages, x), feats

    def teachers_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(z_T, [F_k for every stage], [head logits of each teacher])``: the collaborative pass.

        Eq. 1: stage k of every teacher reads the fused feature of stage k-1 (the images for k = 0),
        and its outputs are fused again, ``F_k = Σ_i softmax(π_k)_i · A_k^i``; every teacher's head
        reads the last fused feature, and ``combine`` merges the heads into z_T.
        """
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
    @classmethod
    def outputs(cls, options, config) -> dict[str, str]:
        return dict(OUTPUTS)

    def forward_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The models' logits (each teacher's: its head on the last fused feature) and the published
        outputs, keyed by reference text. The loss terms (``training_step``) are evaluated on these."""
        z_t, fused, heads = self.teachers_forward(images)
        z_s, feats = self.student_forward(images)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = dict(zip(self.teacher_names, heads))
        out[self.student_name] = z_s
        out[COMBINED] = z_t
        out[f"{FUSED}:stages"] = [fused[k] for k in self.feature_stages]
        out[f"{STUDENT_FEATURES}:stages"] = [feats[k] for k in self.feature_stages]
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
        """``softmax(π)`` of every fusion (the importance fusion's ``weights()``, detached):
        ``"stage<k>"`` and, with combine = "importance", ``"logits"``."""
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

    # -- the default loss terms (Eq. 10) and the checks --------------------------------------------
    @classmethod
    def default_losses(cls, options, config) -> list[LossConfig]:
        """Eq. 10 as loss terms weighted by α, β, γ (see the module docstring); zero weights are left out."""
        o = options or CMTKDOptions()
        students = config.students
        if len(students) != 1:
            return []  # reported by check()
        student = students[0]
        terms = []
        if o.alpha > 0:
            terms += [LossConfig(name="ce", label="ce_student", weight=o.alpha, inputs={"logits": student}, options={}),
                      LossConfig(name="ce", label="ce_teacher", weight=o.alpha, inputs={"logits": COMBINED}, options={})]
        if o.beta > 0:
            terms.append(LossConfig(name="minlogit", label="mutual", weight=o.beta, inputs={"logits": [COMBINED, student]},
                                    options={"temperature": o.temperature}))
        if o.feature_weight > 0 and o.feature_stages != ():
            terms.append(LossConfig(
                name=o.feature_loss, label="feature", weight=o.feature_weight,
                inputs={"student": f"{STUDENT_FEATURES}:stages", "teacher": f"{FUSED}:stages"},
                options={"detach_teacher": o.detach_fused_target}))
        return terms

    @classmethod
    def check(cls, options, config) -> list[tuple[str, str]]:
        return check(options or CMTKDOptions(), config)

    @classmethod
    def check_models(cls, options, config, models: dict[str, nn.Module]) -> list[tuple[str, str]]:
        """Problems that need the built networks (without changing them): each can be staged
        (built-in stages, or split at ``options.stages``), stage counts agree, ``feature_stages`` exist."""
        options = options or CMTKDOptions()
        names = config.students[:1] + config.teachers
        try:
            paths = {name: stage_paths_of(models[name], options.stages, name=name) for name in names}
        except ConfigError as exc:
            return list(exc.problems)
        counts = {name: len(p) for name, p in paths.items()}
        if len(set(counts.values())) != 1:
            return [("models", "every network of CMT-KD needs the same number of stages, got "
                     + ", ".join(f"{n}: {c}" for n, c in counts.items()))]
        k = next(iter(counts.values()))
        bad = [s for s in (options.feature_stages or ()) if s >= k]
        if bad:
            return [("method.feature_stages", (
                f"stage {bad[0]} does not exist: the networks have {k} stages (0..{k - 1}, "
                f"ending at {', '.join(paths[names[0]])})"))]
        return []

    @classmethod
    def prepare_models(cls, options, config, models: dict[str, nn.Module]) -> None:
        """Stage every network (built-in stages, or split at ``options.stages``: only its class changes)."""
        options = options or CMTKDOptions()
        for name in config.students[:1] + config.teachers:
            as_staged(models[name], options.stages, name=name)
