"""First-party method plugins built on the loss-term machinery: ``supervised``, ``kd``, ``mutual``."""

from __future__ import annotations

import kdtoolkit
from kdtoolkit.config.schema import LossConfig
from kdtoolkit.methods import LossTermsMethod


class Supervised(LossTermsMethod):
    """Train one or more models on labels alone. Without ``[[losses]]``, each trained model gets a
    cross-entropy term (``ce`` or ``ce_<model>``)."""

    @classmethod
    def check(cls, options, config):
        problems = []
        for name, spec in config.models.items():
            if spec.frozen:
                problems.append((f"models.{name}.frozen", "method 'supervised' trains every model; remove frozen = true"))
        return problems

    @classmethod
    def default_losses(cls, options, config):
        trained = config.trained
        return [
            LossConfig(name="ce", label="ce" if len(trained) == 1 else f"ce_{n}", inputs={"logits": n})
            for n in trained
        ]


class KD(LossTermsMethod):
    """Distil one student from one or more teachers (Hinton et al., 2015). The teachers are
    usually pretrained and frozen (``frozen = true`` with a ``checkpoint``); several teachers are
    fused by the ``kd`` term's ``fusion``. The loss terms (e.g. ``ce`` + ``kd``) are listed
    explicitly in ``[[losses]]`` with their weights."""

    @classmethod
    def check(cls, options, config):
        problems = []
        students, teachers = config.students, config.teachers
        if len(students) != 1:
            problems.append(("models", f"method 'kd' needs exactly one model with role = \"student\", found {len(students)}"))
        if not teachers:
            problems.append(("models", "method 'kd' needs at least one model with role = \"teacher\""))
        if not config.losses:
            problems.append(("losses", "method 'kd' needs [[losses]] entries, e.g. name = \"ce\" and name = \"kd\" with their weights"))
        return problems


class Mutual(LossTermsMethod):
    """Two or more networks trained together, each learning from the labels and from the others
    (Zhang et al., "Deep Mutual Learning", CVPR 2018; Guo et al., "Online Knowledge Distillation via
    Collaborative Learning" (KDCL), CVPR 2020). Without ``[[losses]]``: ``ce_<model>`` for each
    network plus a ``minlogit`` term over all of them (KDCL-MinLogit, T = 4)."""

    @classmethod
    def check(cls, options, config):
        problems = []
        trained = config.trained
        if len(trained) < 2:
            problems.append(("models", f"method 'mutual' needs at least two trained models, found {len(trained)}"))
        return problems

    @classmethod
    def default_losses(cls, options, config):
        trained = config.trained
        return [LossConfig(name="ce", label=f"ce_{n}", inputs={"logits": n}) for n in trained] + [
            LossConfig(name="minlogit", label="minlogit", inputs={"logits": list(trained)})
        ]


@kdtoolkit.hookimpl
def register_methods(register):
    register("supervised", Supervised, description="cross-entropy training of each model")
    register("kd", KD, description="knowledge distillation from (frozen) teachers through [[losses]]")
    register("mutual", Mutual, description="networks trained together with mutual learning (DML, KDCL-MinLogit)")
