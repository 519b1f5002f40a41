"""The plugin author's package (tests/plugin_pkg: one component of every kind, written from the README
and kdtoolkit.api alone), installed as a distribution under tmp_path by the test kit's
fake_distribution fixture (no pip): found through its entry point, listed, used from TOML and from
Python."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.api import call_loss
from kdtoolkit.cli import main
from kdtoolkit.plugins import load_registry

PKG = Path(__file__).parent / "plugin_pkg"
KINDS = {"dataset": ["blobs"], "model": ["tiny_convnet"], "quantizer": ["uniform"], "loss": ["l1_logits"],
         "fusion": ["max_logits"], "schedule": ["warmup"], "method": ["peer_ml"]}


@pytest.fixture
def example(fake_distribution):
    project = tomllib.loads((PKG / "pyproject.toml").read_text())["project"]
    fake_distribution.install(project["name"], version=project["version"],
                              entry_points=project["entry-points"]["kdtoolkit"], copy_from=[PKG / "kdtoolkit_example"])
    return project


PIPELINE = """
schema_version = 1
[run]
name = "example"
epochs = 2
seed = 1
progress = "off"
output_dir = "{out}"
[data]
name = "blobs"
batch_size = 16
augment = false
[models.student]
name = "tiny_convnet"
width = 4
quantizer = {{ name = "uniform", weight_bits = 2, act_bits = 3 }}
[models.t1]
name = "tiny_convnet"
role = "teacher"
[models.t2]
name = "tiny_convnet"
role = "teacher"
width = 6
[method]
name = "peer_ml"
peer = {{ name = "tiny_convnet", width = 4 }}
mutual_weight = 0.5
[[losses]]
name = "ce"
[[losses]]
name = "ce"
label = "ce_t1"
inputs = {{ logits = "t1" }}
[[losses]]
name = "ce"
label = "ce_t2"
inputs = {{ logits = "t2" }}
[[losses]]
name = "l1_logits"
scale = 0.5
inputs = {{ student = "student", teacher = ["t1", "t2"] }}
fusion = {{ name = "max_logits" }}
schedule = {{ name = "warmup", epochs = 1.0 }}
"""


def test_listed_by_plugins_command(example):
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    row = {row["name"]: row for row in json.loads(result.output)}["example"]
    assert (row["version"], row["distribution"], row["status"]) == ("0.3.0", "kdtoolkit-example", "loaded")
    assert row["provides"] == KINDS
    text = CliRunner().invoke(main, ["plugins"]).output.splitlines()
    assert "example 0.3.0 (kdtoolkit-example)" in text
    assert any(line.startswith("  loss: l1_logits") and "L1 distance" in line for line in text)
    described = CliRunner().invoke(main, ["describe", "method", "peer_ml"]).output
    assert "  peer: a model table" in described and "(required)" in described
    assert "  mutual_weight: a number (default: 1.0)" in described


def test_registered_through_entry_point(example):
    registry = load_registry()
    comp = registry.get("loss", "l1_logits")
    assert comp.plugin == "example"
    loss = comp.factory(comp.make_options(scale=2.0))
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    out = call_loss(loss, student=s, teacher=t)  # as the core calls it: the declared targets detached
    assert torch.allclose(out, 2.0 * (s - t).abs().mean())
    out.backward()
    assert torch.allclose(s.grad, 2.0 * torch.sign(s - t) / s.numel()) and t.grad is None


def test_components_against_their_formulas(example):
    registry = load_registry()
    make = lambda kind, name, **kw: registry.get(kind, name).factory(registry.get(kind, name).make_options(**kw))
    warmup = make("schedule", "warmup", epochs=2.0)
    assert [warmup(e, 10) for e in (0.0, 0.5, 2.0, 7.0)] == [0.0, 0.25, 1.0, 1.0]
    fusion = registry.get("fusion", "max_logits").factory(None, num_inputs=3)
    zs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    expected = torch.tensor([[max(z[i, j].item() for z in zs) for j in range(4)] for i in range(5)], dtype=torch.float64)
    assert torch.equal(fusion(zs), expected)
    quant = make("quantizer", "uniform", weight_bits=3, act_bits=2, act_clip=3.0)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    wq_module = quant.weight_quantizer(3, None)
    wq = wq_module(w)
    s = w.detach().abs().max() / 4
    assert torch.allclose(wq, torch.clamp(torch.round(w.detach() / s), -4, 3) * s)
    wq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    packed = wq_module.export(w.detach().float())
    assert torch.allclose(packed.dequantize(), wq.detach().float())
    x = torch.linspace(-1, 4, 11, dtype=torch.float64)
    assert torch.allclose(quant.act_quantizer(2, None)(x), torch.round(x.clamp(0, 3)))


def test_used_from_toml_through_the_cli(example, tmp_path):
    path = tmp_path / "example.toml"
    path.write_text(PIPELINE.format(out=(tmp_path / "run").as_posix()))
    r = CliRunner().invoke(main, ["run", str(path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for key in ("train/loss/ce", "train/loss/ce_t2", "train/loss/l1_logits", "train/loss/peer_ce",
                "train/loss/peer_mutual", "test/student/top1", "test/peer/top1", "test/t2/top1"):
        assert key in last, key
    assert len(rows) == 2 and all(row["train/loss/peer_ce"] > 0 for row in rows)
    pipe = Pipeline.from_run_dir(tmp_path / "run")
    assert type(pipe.config.models["student"].quantizer.options).__name__ == "UniformOptions"


def test_used_from_python_equals_toml(example, tmp_path):
    from kdtoolkit_example.components import L1LogitsOptions, TinyConvNetOptions, WarmupOptions
    from kdtoolkit_example.method import PeerMLOptions
    from kdtoolkit_example.quant import UniformOptions

    from kdtoolkit.api import LossConfig, ModelConfig
    from kdtoolkit.config import (
        DataConfig, FusionConfig, MethodConfig, PipelineConfig, QuantizerConfig, RunConfig, ScheduleConfig,
    )

    from_toml = Pipeline.from_toml(_write(tmp_path, PIPELINE.format(out=(tmp_path / "run").as_posix())))
    teacher = lambda width: ModelConfig(name="tiny_convnet", role="teacher", options=TinyConvNetOptions(width=width))
    in_python = Pipeline(PipelineConfig(
        run=RunConfig(name="example", epochs=2, seed=1, progress="off", output_dir=(tmp_path / "run").as_posix()),
        data=DataConfig(name="blobs", batch_size=16, augment=False),
        models={"student": ModelConfig(name="tiny_convnet", options=TinyConvNetOptions(width=4),
                                       quantizer=QuantizerConfig(name="uniform", options=UniformOptions(weight_bits=2, act_bits=3))),
                "t1": teacher(8), "t2": teacher(6)},
        method=MethodConfig(name="peer_ml", options=PeerMLOptions(
            peer=ModelConfig(name="tiny_convnet", options=TinyConvNetOptions(width=4)), mutual_weight=0.5)),
        losses=[LossConfig(name="ce"),
                LossConfig(name="ce", label="ce_t1", inputs={"logits": "t1"}),
                LossConfig(name="ce", label="ce_t2", inputs={"logits": "t2"}),
                LossConfig(name="l1_logits", options=L1LogitsOptions(scale=0.5), inputs={"student": "student", "teacher": ["t1", "t2"]},
                           fusion=FusionConfig(name="max_logits"), schedule=ScheduleConfig(name="warmup", options=WarmupOptions(1.0)))],
    ))
    assert in_python.config == from_toml.config


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_mistakes_in_the_plugins_options_are_config_errors(example, tmp_path):
    text = PIPELINE.format(out=(tmp_path / "run").as_posix())
    text = text.replace("peer = { name = \"tiny_convnet\", width = 4 }", "peer = { name = \"tiny_convnet\", widht = 4 }")
    text = text.replace("scale = 0.5", "scael = 0.5").replace("weight_bits = 2", "weight_bits = 9")
    r = CliRunner().invoke(main, ["validate", str(_write(tmp_path, text))])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.splitlines()
    assert "error: method.peer.widht: unknown key (did you mean 'width'?)" in lines
    assert any(line.startswith("error: losses[3].scael: unknown key (did you mean 'scale'") for line in lines)
    assert "error: models.student.quantizer.weight_bits: weight_bits must be 1..8 or 32 (full precision), got 9" in lines


def test_the_readme_testing_example(fake_distribution, tmp_path):
    """The snippet of the README's "Testing a plugin", with this repository's path to the package."""
    from kdtoolkit.testing import TestingPlugin, tiny_pipeline

    fake_distribution.install("kdtoolkit-example", entry_points={"example": "kdtoolkit_example"},
                              copy_from=[PKG / "kdtoolkit_example"])
    raw = tiny_pipeline(tmp_path / "run", optimizer={"lr": 0.05, "schedule": {"name": "warmup", "epochs": 0.5}})
    result = Pipeline(raw, plugins=[TestingPlugin()]).fit()
    assert result["last"]["train/loss/ce"] > 0
