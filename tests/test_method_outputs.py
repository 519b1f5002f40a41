"""Method outputs: a method publishes named tensors (``Method.outputs``/``forward_outputs``) that
``[[losses]]`` refer to like model outputs; the checks accept exactly the declared references."""

from __future__ import annotations

import pytest
import torch

import kdtoolkit
from kdtoolkit import Pipeline
from kdtoolkit.engine.assemble import build_parts
from kdtoolkit.errors import ConfigError
from kdtoolkit.methods import LossTermsMethod, Progress
from kdtoolkit.models import run_stages

STEP = Progress(0, 0, 1, 1)


class Published(LossTermsMethod):
    """Publishes the mean of the two networks' logits and the teacher's stage features, halved."""

    @classmethod
    def outputs(cls, options, config):
        return {"avg": "logits", "half": "stages"}

    def forward_outputs(self, images):
        out = super().forward_outputs(images)
        out["avg"] = (out["student"] + out["teacher"]) / 2
        teacher, x, stages = self._models["teacher"], images, []
        for k in range(len(teacher.stage_paths)):
            x = teacher.forward_stage(k, x)
            stages.append(x / 2)
        out["half:stages"] = stages
        return out


class PublishingPlugin:
    @kdtoolkit.hookimpl
    def register_methods(self, register):
        register("published", Published, description="test method publishing outputs")


def raw(losses: list[dict]) -> dict:
    model = {"name": "wrn", "depth": 10, "width": 1}
    return {
        "data": {"name": "cifar10"},
        "models": {"student": dict(model), "teacher": dict(model, role="teacher")},
        "method": {"name": "published"},
        "losses": losses,
        "run": {"progress": "off", "device": "cpu"},
    }


LOSSES = [
    {"name": "logit_l2", "label": "to_avg", "inputs": {"student": "avg", "teacher": "student"}},
    {"name": "fitnet", "label": "hint", "inputs": {"student": "student:stages", "teacher": "half:stages"}},
]


def test_losses_refer_to_published_outputs_and_get_their_values():
    pipe = Pipeline.from_dict(raw(LOSSES), plugins=[PublishingPlugin()])
    pipe.validate()
    torch.manual_seed(0)
    built = build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=torch.randn(4, 3, 16, 16))
    built.module.eval()  # BN in eval: the reference below sees the same networks
    images = torch.randn(3, 3, 16, 16, dtype=torch.float32)
    terms = built.method.training_step(images, torch.tensor([1, 2, 3]), STEP)

    student, teacher = built.models["student"], built.models["teacher"]
    z_s, z_t = run_stages(student, images), run_stages(teacher, images)
    expected_l2 = (z_s - (z_s + z_t) / 2).pow(2).sum(1).mean()
    torch.testing.assert_close(terms["to_avg"], expected_l2)

    def stage_features(model, scale):
        x, out = images, []
        for k in range(len(model.stage_paths)):
            x = model.forward_stage(k, x)
            out.append(x * scale)
        return out

    hint = next(t for t in built.module.losses if t.label == "hint")
    # setup() saw the published stage shapes (one regressor per stage, built from the probe)
    expected_hint = hint.loss(student=stage_features(student, 1.0), teacher=stage_features(teacher, 0.5))
    torch.testing.assert_close(terms["hint"], expected_hint)
    terms["to_avg"].backward()
    assert teacher.conv1.weight.grad is not None  # "avg" keeps the teacher's graph: published as is


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"student": "student", "teacher": "avgg"}, "unknown model 'avgg'"),
        ({"student": "student", "teacher": "half"}, "refer to it as 'half:stages'"),
    ],
)
def test_checks_name_undeclared_references(inputs, message):
    with pytest.raises(ConfigError) as exc:
        Pipeline.from_dict(raw([{"name": "logit_l2", "inputs": inputs}]), plugins=[PublishingPlugin()])
    assert any(path == "losses[0].inputs.teacher" and message in text for path, text in exc.value.problems), exc.value.problems


def test_an_output_named_like_a_model_is_refused():
    class Clash(Published):
        @classmethod
        def outputs(cls, options, config):
            return {"student": "logits"}

    class ClashPlugin:
        @kdtoolkit.hookimpl
        def register_methods(self, register):
            register("clash", Clash)

    config = dict(raw(LOSSES[:1]), method={"name": "clash"})
    with pytest.raises(ConfigError, match="clashes with a model name"):
        Pipeline.from_dict(config, plugins=[ClashPlugin()])
