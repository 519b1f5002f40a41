"""CMT-KD on the common loss system: its published outputs in ``[[losses]]`` (reweighted, scheduled,
added, swapped terms), its default terms for every paper example, and its checks."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.engine.assemble import build_parts
from kdtoolkit.engine.checks import effective_losses
from kdtoolkit.errors import ConfigError
from kdtoolkit.methods import Progress

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cmtkd"
CMTKD_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.toml") if 'name = "cmtkd"' in p.read_text())


def raw_pipeline(losses=None, **method) -> dict:
    model = {"name": "wrn", "depth": 10, "width": 1}
    models = {"student": dict(model, quantizer={"name": "hwgq", "weight_bits": 2, "act_bits": 2})}
    for bits in (4, 8):
        models[f"t{bits}"] = dict(model, role="teacher", quantizer={"name": "hwgq", "weight_bits": bits, "act_bits": bits})
    raw = {"data": {"name": "cifar10"}, "models": models, "method": {"name": "cmtkd", **method},
           "run": {"progress": "off", "device": "cpu", "epochs": 4}}
    if losses is not None:
        raw["losses"] = losses
    return raw


def build(raw):
    pipe = Pipeline.from_dict(raw)
    torch.manual_seed(0)
    return build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=torch.randn(4, 3, 16, 16))


CUSTOM = [
    {"name": "ce", "label": "ce_student", "inputs": {"logits": "student"}},
    # swapped: label-smoothed CE on the combined teacher
    {"name": "ce", "label": "ce_teacher", "label_smoothing": 0.1, "inputs": {"logits": "combined_teacher"}},
    # added: Hinton KD from the combined teacher to the student
    {"name": "kd", "label": "kd", "weight": 0.25, "temperature": 2.0, "inputs": {"student": "student", "teacher": "combined_teacher"}},
    # scheduled γ: on for the first two of four epochs
    {"name": "attention", "label": "feature", "weight": 100.0, "detach_teacher": False,
     "inputs": {"student": "student_features:stages", "teacher": "fused:stages"},
     "schedule": {"name": "piecewise", "epochs": [0, 2], "values": [1.0, 0.0]}},
]


def test_explicit_losses_reweight_schedule_add_and_swap_terms_on_the_published_outputs():
    built = build(raw_pipeline(CUSTOM))
    method = built.method
    assert [t.label for t in built.module.losses] == ["ce_student", "ce_teacher", "kd", "feature"]
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    method.eval()  # deterministic BN: the reference below sees the same networks
    early = method.training_step(images, labels, Progress(0, 0, 1, 4))
    late = method.training_step(images, labels, Progress(3, 0, 1, 4))
    out = method.forward_outputs(images)
    z_s, z_t = out["student"], out["combined_teacher"]

    # references written from the formulas, on the published tensors
    def ce(z, eps=0.0):
        logp = torch.log_softmax(z, 1)
        return (-(1 - eps) * logp.gather(1, labels.view(-1, 1)).squeeze(1) - eps * logp.mean(1)).mean()

    p_t, logq_s = torch.softmax(z_t / 2.0, 1), torch.log_softmax(z_s / 2.0, 1)
    kd = 4.0 * (p_t * (p_t.log() - logq_s)).sum(1).mean()

    def at(f):
        a = f.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    feat = sum(((at(s) - at(t)) ** 2).mean() for s, t in zip(out["student_features:stages"], out["fused:stages"]))
    torch.testing.assert_close(early["ce_student"], ce(z_s))
    torch.testing.assert_close(early["ce_teacher"], ce(z_t, 0.1))
    torch.testing.assert_close(early["kd"], 0.25 * kd)
    torch.testing.assert_close(early["feature"], 100.0 * feat)
    assert float(late["feature"].detach()) == 0.0 and float(late["kd"].detach()) > 0  # the schedule switched γ off
    # the feature term, with detach_teacher = false, trains the teachers and π through F_k
    early["feature"].backward()
    assert built.models["t4"].conv1.weight.grad.abs().sum() > 0
    assert method.fusion[0].importance.grad.abs().sum() > 0


def test_cli_validates_a_cmtkd_pipeline_with_losses_and_names_bad_references(tmp_path):
    path = tmp_path / "p.toml"
    text = (EXAMPLES / "cifar100_resnet18_cmtkd.toml").read_text()
    kept = text.split("[method]")[0] + '[method]\nname = "cmtkd"\n' + "[optimizer]" + text.split("[optimizer]")[1]
    path.write_text(kept + """
[[losses]]
name = "ce"
[[losses]]
name = "ce"
label = "ce_teacher"
inputs = { logits = "combined_teacher" }
[[losses]]
name = "attention"
weight = 100.0
inputs = { student = "student_features:stages", teacher = "fused:stages" }
""")
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    path.write_text(path.read_text().replace('teacher = "fused:stages"', 'teacher = "fused"'))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 2 and "losses[2].inputs.teacher" in r.output and "fused:stages" in r.output, r.output


def test_default_term_options_with_explicit_losses_are_reported():
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(raw_pipeline(CUSTOM, gamma=10.0, temperature=2.0))
    problems = dict(info.value.problems)
    assert set(problems) == {"method.gamma", "method.temperature"}
    assert "only shapes the default loss terms" in problems["method.gamma"]


@pytest.mark.parametrize("path", CMTKD_EXAMPLES, ids=lambda p: p.name)
def test_every_paper_example_gets_eq10_as_its_default_terms(path):
    """Each example's α, β, γ, T and feature loss, as written in its [method] table, become the
    default terms' weights and options (a zero weight leaves its term out)."""
    method = tomllib.loads(path.read_text())["method"]
    alpha, beta, temperature = method.get("alpha", 1.0), method.get("beta", 0.5), method.get("temperature", 4.0)
    feature = method.get("feature_loss", "attention")
    gamma = method.get("gamma", {"attention": 100.0, "fitnet": 1.0}[feature])
    pipe = Pipeline.from_toml(path)
    terms = {lc.label: lc for lc in effective_losses(pipe.config, pipe.registry)}
    expected = {}
    if alpha:
        expected.update(ce_student=("ce", alpha), ce_teacher=("ce", alpha))
    if beta:
        expected["mutual"] = ("minlogit", beta)
    if gamma:
        expected["feature"] = (feature, gamma)
    assert {k: (lc.name, lc.weight) for k, lc in terms.items()} == expected
    assert terms["ce_teacher"].inputs == {"logits": "combined_teacher"}
    if beta:
        assert terms["mutual"].options.temperature == temperature
        assert terms["mutual"].inputs == {"logits": ["combined_teacher", "student"]}
    if gamma:
        assert terms["feature"].options.detach_teacher is False
        assert terms["feature"].inputs == {"student": "student_features:stages", "teacher": "fused:stages"}


def test_the_explicit_losses_example_is_the_default_pipeline():
    default = Pipeline.from_toml(EXAMPLES / "cifar100_resnet18_cmtkd.toml")
    explicit = Pipeline.from_toml(EXAMPLES / "cifar100_resnet18_cmtkd_explicit_losses.toml")
    assert explicit.config.losses and not default.config.losses
    assert effective_losses(explicit.config, explicit.registry) == effective_losses(default.config, default.registry)
    assert explicit.config.models == default.config.models and explicit.config.optimizer == default.config.optimizer


def test_validate_fails_when_the_importance_fusion_plugin_is_blocked(tmp_path):
    """E6 of the review: `kdtoolkit validate` said ok for CMT-KD with the `fusions` plugin blocked."""
    path = tmp_path / "p.toml"
    path.write_text((EXAMPLES / "cifar100_resnet18_cmtkd.toml").read_text() + '\n[plugins]\nblocked = ["fusions"]\n')
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    assert "error: method.name: method 'cmtkd' (plugin 'cmtkd') needs fusion 'importance'" in r.output and "Traceback" not in r.output
