"""CTKD: collaborative teaching knowledge distillation.

Zhao et al., "Highlight Every Step: Knowledge Distillation via Collaborative Teaching", IEEE
Transactions on Cybernetics 2022 (arXiv:1907.09643). Three networks: a *scratch teacher* trained from
scratch together with the *student*, and a pretrained, frozen *expert teacher*::

    L = CE(z_scr, y) + CE(z_s, y) + γ·(1/B)·‖sg(z_scr) − z_s‖² + β·Σ_j AT(F_s^j, F_exp^j)

The logit hint (``logit_l2``) follows the scratch teacher's current logits at every step with the
gradient blocked into the scratch teacher; the attention terms pair the outputs of the residual groups
(``"<model>:stages"``). Each part is an ordinary loss term, so everything is logged by name.
"""

from __future__ import annotations

from typing import Optional

import attrs
from torch import nn

import kdtoolkit
from kdtoolkit.config.schema import LossConfig, PipelineConfig
from kdtoolkit.config.validators import non_negative, one_of
from kdtoolkit.errors import ConfigError
from kdtoolkit.features import resolve_module
from kdtoolkit.methods import LossTermsMethod, MethodContext

__all__ = ["CTKD", "CTKDOptions", "register_methods"]

ATTENTION_TARGETS = ("student", "scratch")

#: γ chosen by the sweep in examples/ctkd/README.md (the paper does not publish it).
DEFAULT_GAMMA = 0.1
#: β: the attention-transfer convention on CIFAR (Zagoruyko & Komodakis).
DEFAULT_BETA = 1000.0


@attrs.frozen
class CTKDOptions:
    """Options of ``[method] name = "ctkd"``.

    ``gamma``, ``beta`` and ``attention_target`` shape the default loss terms only; with explicit
    ``[[losses]]`` they must stay at their defaults (set the terms' weights instead).
    """

    #: weight of the logit hint ``(1/B)·‖sg(z_scr) − z_s‖²`` (not published; see examples/ctkd/README.md).
    gamma: float = attrs.field(default=DEFAULT_GAMMA, validator=non_negative)
    #: weight of the attention-transfer sum over the residual groups (AT's CIFAR convention).
    beta: float = attrs.field(default=DEFAULT_BETA, validator=non_negative)
    #: which network the expert's attention guides: "student" (the paper) or "scratch" (the
    #: authors' released code, where a ``zip`` pairs the expert with the scratch teacher).
    attention_target: str = attrs.field(default="student", validator=one_of(ATTENTION_TARGETS))
    #: tie the first conv of the student to the scratch teacher's (one parameter, as in the released code).
    share_first_conv: bool = False
    #: module path of the first conv in both networks (``conv1`` for the WRN/ResNet plugins).
    first_conv: str = "conv1"
    #: model name of the scratch teacher; needed only when several teachers are trained.
    scratch: Optional[str] = None
    #: model name of the expert teacher; needed only when several teachers are frozen.
    expert: Optional[str] = None


def _resolve(options: CTKDOptions, config: PipelineConfig) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The three networks by part (``student``/``scratch``/``expert``), and the problems found."""
    models = config.models
    problems: list[tuple[str, str]] = []
    names: dict[str, str] = {}

    students = config.students
    if len(students) == 1:
        names["student"] = students[0]
        if models[students[0]].frozen:
            problems.append((f"models.{students[0]}.frozen", "the CTKD student is trained: remove frozen = true"))
    else:
        problems.append(("models", f"method 'ctkd' needs exactly one model with role = \"student\", found {len(students)}"))

    for part, frozen, what in (
        ("scratch", False, "the scratch teacher (role = \"teacher\", trained jointly: frozen = false)"),
        ("expert", True, "the expert teacher (role = \"teacher\", frozen = true, checkpoint = \"RUN_DIR\")"),
    ):
        chosen = getattr(options, part)
        if chosen is not None:
            spec = models.get(chosen)
            if spec is None:
                problems.append((f"method.{part}", f"no model {chosen!r}; models: {', '.join(models)}"))
            elif spec.role != "teacher" or spec.frozen != frozen:
                problems.append((f"method.{part}", f"model {chosen!r} must be {what}"))
            else:
                names[part] = chosen
            continue
        found = [n for n, s in models.items() if s.role == "teacher" and s.frozen == frozen]
        if len(found) == 1:
            names[part] = found[0]
        elif not found:
            problems.append(("models", f"method 'ctkd' needs {what}; none found"))
        else:
            problems.append((f"method.{part}", f"several candidates for {what}: {', '.join(found)}; name one with {part} = \"NAME\""))

    # a frozen model without checkpoint is reported by the core (models.<name>.checkpoint)
    return names, problems


class CTKD(LossTermsMethod):
    """Collaborative teaching KD (Zhao et al., "Highlight Every Step", 2022; arXiv:1907.09643).

    Models: exactly one student, one trained teacher (the scratch teacher) and one frozen teacher
    with a ``checkpoint`` (the expert, trained first by a ``supervised`` pipeline). ``scratch`` and
    ``expert`` name them when there is more than one candidate.

    Without ``[[losses]]`` the terms are ``ce_<scratch>``, ``ce_<student>``, ``logit_l2`` (weight
    ``gamma``; the student follows the scratch teacher's detached logits) and ``attention`` (weight
    ``beta``; AT between the expert's residual-group outputs and the student's, or the scratch
    teacher's with ``attention_target = "scratch"``). With ``[[losses]]`` those are used as given.

    ``share_first_conv = true`` ties the student's first conv to the scratch teacher's: the same
    ``nn.Parameter`` objects, so both networks' gradients add up in it and the optimizer steps it once.
    """

    def __init__(self, options: CTKDOptions, context: MethodContext):
        super().__init__(options, context)
        names, problems = _resolve(options, context.config)
        if problems:
            raise ConfigError(problems=problems)
        self.student_name, self.scratch_name, self.expert_name = names["student"], names["scratch"], names["expert"]

    @classmethod
    def prepare_models(cls, options, config, models):
        """``share_first_conv``: tie the student's first conv to the scratch teacher's."""
        names, problems = _resolve(options, config)
        if options.share_first_conv and not problems:
            tie_parameters(models[names["scratch"]], models[names["student"]], options.first_conv,
                           names=(names["scratch"], names["student"]))

    @classmethod
    def check(cls, options, config):
        options = options if isinstance(options, CTKDOptions) else CTKDOptions()
        names, problems = _resolve(options, config)
        if not config.losses and not problems:
            for name in config.models:
                if name not in names.values():
                    problems.append((f"models.{name}", "not used by the default CTKD terms (student, scratch and expert teachers); remove it or list [[losses]]"))
        if config.losses:
            defaults = CTKDOptions()
            for key in ("gamma", "beta", "attention_target"):
                if getattr(options, key) != getattr(defaults, key):
                    problems.append((f"method.{key}", f"{key} only shapes the default loss terms; with [[losses]] listed, set the terms' weights and inputs there"))
        return problems

    @classmethod
    def default_losses(cls, options, config):
        names, problems = _resolve(options, config)
        if problems:  # reported by check(); nothing sensible to build
            return []
        student, scratch, expert = names["student"], names["scratch"], names["expert"]
        guided = student if options.attention_target == "student" else scratch
        return [
            LossConfig(name="ce", label=f"ce_{scratch}", inputs={"logits": scratch}),
            LossConfig(name="ce", label=f"ce_{student}", inputs={"logits": student}),
            LossConfig(name="logit_l2", label="logit_l2", weight=options.gamma, inputs={"student": student, "teacher": scratch}),
            LossConfig(name="attention", label="attention", weight=options.beta,
                       inputs={"student": f"{guided}:stages", "teacher": f"{expert}:stages"}),
        ]


def tie_parameters(source: nn.Module, target: nn.Module, path: str, *, names: tuple[str, str] = ("source", "target")) -> None:
    """Make ``target``'s module at ``path`` use ``source``'s parameters (the same objects).

    Only the parameters are shared (hooks and module types stay each network's own); shapes must
    agree. Buffers are not shared (a conv has none).
    """
    src, dst = resolve_module(source, path), resolve_module(target, path)
    src_params = dict(src.named_parameters(recurse=False))
    dst_params = dict(dst.named_parameters(recurse=False))
    if src_params.keys() != dst_params.keys() or not src_params:
        raise ConfigError(problems=[("method.first_conv", f"{names[0]}.{path} and {names[1]}.{path} do not have the same parameters ({sorted(src_params)} vs {sorted(dst_params)})")])
    for key, p in src_params.items():
        if p.shape != dst_params[key].shape:
            raise ConfigError(problems=[("method.share_first_conv", f"{names[0]}.{path}.{key} has shape {tuple(p.shape)} but {names[1]}.{path}.{key} has {tuple(dst_params[key].shape)}")])
    for key, p in src_params.items():
        setattr(dst, key, p)


@kdtoolkit.hookimpl
def register_methods(register):
    register("ctkd", CTKD, options=CTKDOptions,
             description="collaborative teaching KD (Zhao et al. 2022): scratch teacher's logit hint + expert's attention")
