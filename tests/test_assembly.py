"""One assembly pass: every model is built once per `kdtoolkit run`, `validate --full` rejects before
training what `run` would, and networks a method adds behave like `[models]` entries."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

import kdtoolkit
from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.config.schema import ModelConfig
from kdtoolkit.engine import assemble as assemble_module
from kdtoolkit.engine import trainer as trainer_module
from kdtoolkit.methods import LossTermsMethod

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.toml"))


def fake_data(path: Path, cfg):
    """(splits, train loader, test loader) of random images of the example's geometry."""
    if cfg.data.name == "imagefolder":
        classes, size = (200, 64) if "tinyimagenet" in path.name else (1000, 224)
    else:
        classes, size = (100 if cfg.data.name == "cifar100" else 10), 32
    batch = (torch.randn(2, 3, size, size), torch.tensor([0, 1]))
    splits = type("Splits", (), {"num_classes": classes, "train": [batch], "test": [batch]})()
    return splits, [batch], [batch]


def counting(registry, calls: list):
    """Wrap every model factory of ``registry`` so that each call is recorded."""
    table = registry._components["model"]
    for name, component in list(table.items()):
        def factory(options, *, num_classes, _inner=component.factory, _name=name):
            calls.append(_name)
            return _inner(options, num_classes=num_classes)

        table[name] = attrs.evolve(component, factory=factory)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_model_is_built_once_per_run(path, tmp_path, monkeypatch):
    """What `kdtoolkit run` does (validate --full, then fit), with the data, the teachers'
    checkpoints and the training loop replaced by stand-ins: the model factories run once per model."""
    loaded = []
    monkeypatch.setattr(assemble_module, "load_pretrained", lambda model, spec, name: loaded.append(name))
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self, resume=False, **kwargs: {"best": None, "run_dir": str(self.run_dir)})
    pipe = Pipeline.from_toml(path, overrides=[f'run.output_dir="{(tmp_path / "run").as_posix()}"', 'run.device="cpu"'])
    monkeypatch.setattr(pipe, "load_data", lambda device=None: fake_data(path, pipe.config))
    calls: list[str] = []
    counting(pipe.registry, calls)
    pipe.validate(full=True)
    pipe.fit()
    assert len(calls) == len(pipe.config.models), calls
    assert sorted(loaded) == sorted(n for n, s in pipe.config.models.items() if s.checkpoint)


# --- validate --full rejects what run would ------------------------------------------------------


def pipeline_text(root, run_dir, models: str, losses: str = '[[losses]]\nname = "ce"\n', run: str = "") -> str:
    return textwrap.dedent(f"""
        [run]
        name = "tiny"
        epochs = 1
        max_steps_per_epoch = 1
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        device = "cpu"
    """) + textwrap.dedent(run) + textwrap.dedent(f"""
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 16
        eval_batch_size = 32
        train_size = 32
        test_size = 32
    """) + textwrap.dedent(models) + textwrap.dedent(losses)


STUDENT = """
    [models.student]
    name = "wrn"
    depth = 10
    width = 1
"""


def validate_full(tmp_path, text: str):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["validate", "--full", str(path)])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


KD = """
    [method]
    name = "kd"
    [[losses]]
    name = "ce"
    [[losses]]
    name = "kd"
"""


def teacher(checkpoint: str, width: int = 1) -> str:
    return f"""
        [models.teacher]
        name = "wrn"
        depth = 10
        width = {width}
        role = "teacher"
        frozen = true
        checkpoint = "{checkpoint}"
    """


def test_validate_full_rejects_a_missing_checkpoint(cifar10_root, tmp_path):
    line = one_error(validate_full(tmp_path, pipeline_text(cifar10_root, tmp_path / "r", STUDENT + teacher((tmp_path / "nowhere").as_posix()), KD)))
    assert "models.teacher.checkpoint" in line and "no such checkpoint" in line


def test_validate_full_rejects_a_checkpoint_that_does_not_fit(cifar10_root, tmp_path):
    first = tmp_path / "first.toml"
    first.write_text(pipeline_text(cifar10_root, tmp_path / "teacher_run", STUDENT))
    assert CliRunner().invoke(main, ["run", str(first)]).exit_code == 0
    line = one_error(validate_full(tmp_path, pipeline_text(cifar10_root, tmp_path / "r", STUDENT + teacher((tmp_path / "teacher_run").as_posix(), width=2), KD)))
    assert "models.teacher.checkpoint" in line and "do not fit" in line
    # the plain (file-free) validate does not read it
    assert CliRunner().invoke(main, ["validate", str(tmp_path / "p.toml")]).exit_code == 0


def test_validate_full_runs_loss_setup_on_the_probe_shapes(cifar10_root, tmp_path):
    models = STUDENT + """
        [models.t]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
    """
    losses = """
        [method]
        name = "kd"
        [[losses]]
        name = "attention"
        inputs = { student = "student:block1", teacher = "t:block3" }
    """
    line = one_error(validate_full(tmp_path, pipeline_text(cifar10_root, tmp_path / "r", models, losses, run="")))
    assert "losses[0]" in line and "spatial sizes differ" in line


def test_validate_full_builds_the_optimizer(cifar10_root, tmp_path, monkeypatch):
    from kdtoolkit.engine import checks

    monkeypatch.setattr(checks, "check_config", lambda cfg, registry, blocked=(): [])  # let a frozen-only pipeline through
    text = pipeline_text(cifar10_root, tmp_path / "r", STUDENT + 'frozen = true\n')
    with pytest.raises(kdtoolkit.errors.ConfigError, match="nothing to train"):
        pipe = Pipeline.from_dict(__import__("tomllib").loads(text))
        pipe.validate(full=True)


def test_a_bad_output_dir_is_a_config_error(cifar10_root, tmp_path):
    text = pipeline_text(cifar10_root, tmp_path / "r", STUDENT).replace(f'output_dir = "{(tmp_path / "r").as_posix()}"', 'output_dir = "runs/{nam}"')
    path = tmp_path / "p.toml"
    path.write_text(text)
    line = one_error(CliRunner().invoke(main, ["validate", str(path)]))
    assert "run.output_dir" in line


# --- networks a method adds ------------------------------------------------------------------------


class WithPeer(LossTermsMethod):
    """A method that trains a peer network beside the student (its own ``peer`` model)."""

    @classmethod
    def extra_models(cls, options, config):
        return {"peer": ModelConfig(name="wrn", options=config.models["student"].options,
                                    quantizer=config.models["student"].quantizer)}

    @classmethod
    def default_losses(cls, options, config):
        from kdtoolkit.config.schema import LossConfig

        return [LossConfig(name="ce", label="ce_student", inputs={"logits": "student"}),
                LossConfig(name="ce", label="ce_peer", inputs={"logits": "peer"}),
                LossConfig(name="dml", inputs={"logits": ["student", "peer"]})]


class PeerPlugin:
    @kdtoolkit.hookimpl
    def register_methods(self, register):
        register("with_peer", WithPeer)


def test_a_model_the_method_adds_trains_evaluates_and_is_checkpointed(cifar10_root, tmp_path):
    models = STUDENT + 'quantizer = { name = "lsq", weight_bits = 4, act_bits = 4 }\n'
    text = pipeline_text(cifar10_root, tmp_path / "r", models, losses="") + '[method]\nname = "with_peer"\n'
    pipe = Pipeline.from_dict(__import__("tomllib").loads(text), plugins=[PeerPlugin()])
    assert "peer" in pipe.config.models and "peer" not in pipe.raw["models"]  # pipeline.json stays as written
    result = pipe.fit()
    last = result["last"]
    assert {"train/loss/ce_peer", "train/loss/dml", "test/peer/top1", "test/student/top1"} <= set(last)
    from kdtoolkit.engine.checkpoint import Checkpoint

    ckpt = Checkpoint(tmp_path / "r" / "checkpoints" / "last.safetensors")
    peer_state = ckpt.model_state("peer")
    assert any("quantizer" in k for k in peer_state)  # quantized like the student
    assert json.loads((tmp_path / "r" / "pipeline.json").read_text())["method"]["name"] == "with_peer"


def test_the_environment_record_never_builds_the_native_kernels(monkeypatch):
    from kdtoolkit.quant import native

    def refuse():
        raise AssertionError("environment.json built the native kernels")

    monkeypatch.setattr(native, "prepare", refuse)
    raw = {"data": {"name": "cifar10"}, "losses": [{"name": "ce"}],
           "models": {"student": {"name": "wrn", "depth": 10, "width": 1, "quantizer": {"name": "lsq", "weight_bits": 2, "act_bits": 2}}}}
    assert Pipeline.from_dict(raw)._environment()["native_quantizer_kernels"] == native.status()["available"]
