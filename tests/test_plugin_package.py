"""A real third-party plugin package (tests/plugin_pkg) installed into the environment: found through
the entry point, listed by `kdtoolkit plugins`, and used by name from a pipeline TOML."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit import Pipeline
from kdtoolkit.cli import main
from kdtoolkit.plugins import load_registry

from conftest import tiny_pipeline

PKG = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def installed_package():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(PKG)], check=True)
    yield "kdtoolkit-example-loss"
    subprocess.run([*pip, "uninstall", "-y", "kdtoolkit-example-loss"], check=True)


def test_listed_by_plugins_command(installed_package):
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["example_loss"] == {"name": "example_loss", "version": "0.3.0", "provides": {"loss": ["l1_logits"]}}
    text = CliRunner().invoke(main, ["plugins"]).output
    assert "example_loss 0.3.0" in text and "loss: l1_logits" in text


def test_registered_through_entry_point(installed_package):
    registry = load_registry()
    comp = registry.get("loss", "l1_logits")
    assert comp.plugin == "example_loss"
    loss = comp.factory(comp.make_options(scale=2.0))
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    out = loss(student=s, teacher=t)
    assert torch.allclose(out, 2.0 * (s - t).abs().mean())
    out.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None  # reaches the student, never the teacher


@pytest.mark.slow
def test_used_by_name_from_a_pipeline(installed_package, cifar10_root, tmp_path):
    extra = """
        [models.peer]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
    """
    losses = """
        [[losses]]
        name = "ce"
        [[losses]]
        name = "ce"
        label = "ce_peer"
        inputs = { logits = "peer" }
        [[losses]]
        name = "l1_logits"
        scale = 0.5
        inputs = { student = "student", teacher = "peer" }
    """
    raw = tomllib.loads(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1, losses=losses, extra=extra))
    raw["run"]["max_steps_per_epoch"] = 2
    result = Pipeline.from_dict(raw).fit()
    assert "train/loss/l1_logits" in result["last"]
    # misspelt options of a third-party plugin are caught like the core's
    raw["losses"][2]["scael"] = 1.0
    with pytest.raises(Exception, match="did you mean 'scale'"):
        Pipeline.from_dict(raw)
