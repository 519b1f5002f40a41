"""Registration checks the contracts, naming the plugin; losses registered with a function factory,
fusions that need labels and components that require others work (or fail validation) through a
pipeline, the way users reach them."""

from __future__ import annotations

import textwrap

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import kdtoolkit
from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.engine.assemble import build_parts
from kdtoolkit.errors import ConfigError, PluginError
from kdtoolkit.methods import LossTermsMethod, Progress
from kdtoolkit.models import run_stages
from kdtoolkit.plugins import load_registry

STEP = Progress(0, 0, 1, 1)
WRN = {"name": "wrn", "depth": 10, "width": 1}


def plugin(kind: str, *calls):
    """A plugin object whose ``register_<kind>s`` makes ``calls`` (``(args, kwargs)`` pairs)."""

    class Plugin:
        pass

    def hook(self, register):
        for args, kwargs in calls:
            register(*args, **kwargs)

    hook.__name__ = f"register_{kind}es" if kind.endswith("s") else f"register_{kind}s"
    setattr(Plugin, hook.__name__, kdtoolkit.hookimpl(hook))
    Plugin.__name__ = f"my_{kind}_plugin"
    return Plugin()


def registration_error(kind, *args, **kwargs) -> str:
    with pytest.raises(PluginError) as exc:
        load_registry(load_entrypoints=False, plugins=[plugin(kind, (args, kwargs))])
    assert "my_" in str(exc.value)  # names the plugin
    return str(exc.value)


# --- registration --------------------------------------------------------------------------------


def test_a_method_factory_must_be_a_method():
    assert "subclass of kdtoolkit.methods.Method" in registration_error("method", "m", lambda options, context: None)


def test_a_misspelled_method_member_is_refused():
    class Typo(LossTermsMethod):
        @classmethod
        def default_loss(cls, options, config):  # never called: the contract is default_losses
            return []

    message = registration_error("method", "typo", Typo)
    assert "'default_loss'" in message and "did you mean 'default_losses'" in message


def test_a_method_with_its_own_helpers_registers():
    class Fine(LossTermsMethod):
        def teachers_forward(self, images):
            return images

    load_registry(load_entrypoints=False, plugins=[plugin("method", (("fine", Fine), {}))])


def test_a_loss_without_declared_inputs_is_refused():
    assert "declares no inputs" in registration_error("loss", "l", lambda options: (lambda **kw: 0))


def test_a_fusion_that_needs_labels_must_take_them():
    class NoLabels(torch.nn.Module):
        def __init__(self, options, *, num_inputs):
            super().__init__()

        def forward(self, tensors, temperature=None):
            return tensors[0]

    assert "takes no 'labels'" in registration_error("fusion", "f", NoLabels, needs_labels=True)


def test_requires_names_known_kinds():
    assert "unknown kind 'fusions'" in registration_error("loss", "l", lambda o: None, inputs=("logits",), requires={"fusions": ["x"]})


# --- through a pipeline --------------------------------------------------------------------------


def l1_factory(options):
    """A plain function factory: no class, no ``inputs`` attribute."""

    def l1(student, teacher):
        return (student - teacher).abs().mean()

    l1.detach = ("teacher",)  # the core detaches the teacher: the loss does not
    return l1


def test_a_function_factory_loss_trains_and_its_target_is_detached_by_the_core():
    raw = {
        "data": {"name": "cifar10"},
        "models": {"student": dict(WRN), "teacher": dict(WRN, role="teacher")},
        "method": {"name": "kd"},
        "losses": [{"name": "l1_fn", "inputs": {"student": "student", "teacher": "teacher"}}],
        "run": {"device": "cpu"},
    }
    pipe = Pipeline.from_dict(raw, plugins=[plugin("loss", (("l1_fn", l1_factory), {"inputs": ("student", "teacher")}))])
    pipe.validate()
    torch.manual_seed(0)
    built = build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=torch.randn(2, 3, 16, 16))
    built.module.eval()
    images = torch.randn(3, 3, 16, 16)
    terms = built.method.training_step(images, torch.tensor([0, 1, 2]), STEP)
    z_s, z_t = run_stages(built.models["student"], images), run_stages(built.models["teacher"], images)
    torch.testing.assert_close(terms["l1_fn"], (z_s - z_t).abs().mean())
    terms["l1_fn"].backward()
    assert built.models["student"].fc.weight.grad.abs().sum() > 0
    assert built.models["teacher"].fc.weight.grad is None


def minlogit_kd_reference(z_s, teachers, labels, T):
    """KD (T²·KL, batch mean) towards the KDCL-MinLogit ensemble of ``teachers``, from the formulas:
    shift each teacher's logits so the target class is 0, take the element-wise minimum."""
    idx = torch.arange(len(labels))
    shifted = [z - z[idx, labels][:, None] for z in teachers]
    ensemble = torch.stack(shifted).min(dim=0).values
    p = torch.softmax(ensemble / T, dim=1)
    log_q = torch.log_softmax(z_s / T, dim=1)
    return T * T * (p * (torch.log(p) - log_q)).sum(dim=1).mean()


def test_minlogit_fusion_gets_the_labels_in_a_kd_term():
    raw = {
        "data": {"name": "cifar10"},
        "models": {"student": dict(WRN), "t1": dict(WRN, role="teacher"), "t2": dict(WRN, role="teacher")},
        "method": {"name": "kd"},
        "losses": [{"name": "kd", "temperature": 2.0, "inputs": {"teacher": ["t1", "t2"]}, "fusion": {"name": "minlogit"}}],
        "run": {"device": "cpu"},
    }
    pipe = Pipeline.from_dict(raw)
    assert pipe.registry.get("fusion", "minlogit").needs_labels
    torch.manual_seed(0)
    built = build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=torch.randn(2, 3, 16, 16))
    built.module.eval()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([3, 1, 4, 1])
    terms = built.method.training_step(images, labels, STEP)
    with torch.no_grad():
        z = {n: run_stages(m, images).double() for n, m in built.models.items()}
    expected = minlogit_kd_reference(z["student"], [z["t1"], z["t2"]], labels, 2.0)
    torch.testing.assert_close(terms["kd"].double(), expected, rtol=1e-5, atol=1e-7)  # float32 networks


def tiny_run(root, run_dir, models: str, losses: str, extra: str = "") -> str:
    return textwrap.dedent(f"""
        [run]
        name = "tiny"
        epochs = 1
        max_steps_per_epoch = 2
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        device = "cpu"
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 16
        eval_batch_size = 64
        train_size = 64
        test_size = 64
        [method]
        name = "kd"
    """) + textwrap.dedent(models) + textwrap.dedent(losses) + textwrap.dedent(extra)


TWO_TEACHERS = """
    [models.student]
    name = "wrn"
    depth = 10
    width = 1
    [models.t1]
    name = "wrn"
    depth = 10
    width = 1
    role = "teacher"
    [models.t2]
    name = "wrn"
    depth = 10
    width = 1
    role = "teacher"
"""


def test_minlogit_fusion_trains_through_the_cli(cifar10_root, tmp_path):
    losses = """
        [[losses]]
        name = "ce"
        [[losses]]
        name = "kd"
        inputs = { teacher = ["t1", "t2"] }
        fusion = { name = "minlogit" }
    """
    path = tmp_path / "p.toml"
    path.write_text(tiny_run(cifar10_root, tmp_path / "run", TWO_TEACHERS, losses))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "train/loss/kd" in (tmp_path / "run" / "metrics.jsonl").read_text()


class NeedsImportance(LossTermsMethod):
    """A method that builds on the ``importance`` fusion (declared with requires=)."""


def test_validate_names_a_required_component_of_a_blocked_plugin(capsys):
    raw = {
        "data": {"name": "cifar10"},
        "models": {"student": dict(WRN)},
        "method": {"name": "needs_importance"},
        "losses": [{"name": "ce"}],
        "plugins": {"blocked": ["fusions"]},
    }
    methods = plugin("method", (("needs_importance", NeedsImportance), {"requires": {"fusion": ["importance"]}}))
    with pytest.raises(ConfigError) as exc:
        Pipeline.from_dict(raw, plugins=[methods])
    (path, message), = exc.value.problems
    assert path == "method.name"
    assert "'needs_importance'" in message and "fusion 'importance'" in message and "my_method_plugin" in message
    assert "blocked plugins: fusions" in message
    raw["plugins"]["blocked"] = []
    Pipeline.from_dict(raw, plugins=[methods])  # with the plugin loaded it validates


def test_a_component_contributes_default_param_groups():
    """A fusion with ``param_groups()`` gets its own learning-rate scale without any method code."""

    class Scaled(torch.nn.Module):
        def __init__(self, options, *, num_inputs):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(num_inputs))

        def forward(self, tensors, temperature=None):
            return sum(torch.softmax(self.w, 0)[i] * t for i, t in enumerate(tensors))

        def param_groups(self):
            return [(["w"], 0.1, 0.0)]

    raw = {
        "data": {"name": "cifar10"},
        "models": {"student": dict(WRN), "t1": dict(WRN, role="teacher"), "t2": dict(WRN, role="teacher")},
        "method": {"name": "kd"},
        "losses": [{"name": "kd", "inputs": {"teacher": ["t1", "t2"]}, "fusion": {"name": "scaled"}}],
    }
    pipe = Pipeline.from_dict(raw, plugins=[plugin("fusion", (("scaled", Scaled), {}))])
    built = build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"), sample=None)
    group = next(g for g in built.optimizer.param_groups if "losses.0.fusion.w" in g["names"])
    assert group["names"] == ["losses.0.fusion.w"] and group["lr_scale"] == 0.1 and group["weight_decay"] == 0.0
