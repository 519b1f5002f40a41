"""The command line: one line per problem, exit code 2, no tracebacks; plugin listing shape."""

import json
import subprocess
import sys

from click.testing import CliRunner

from kdtoolkit.cli import main

BAD = """
schema_version = 1
[run]
epochs = "two"
[data]
name = "cifar10"
[models.student]
name = "wrn"
widht = 1
[[losses]]
name = "cee"
"""


def test_validate_reports_all_mistakes_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 3
    assert any("run.epochs" in line for line in lines)
    assert any("models.student.widht" in line and "width" in line for line in lines)
    assert any("losses[0].name" in line for line in lines)
    assert "Traceback" not in result.output


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    proc = subprocess.run([sys.executable, "-m", "kdtoolkit.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 3


def test_missing_file_and_invalid_toml(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["validate", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "no such file" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nepochs = 1")
    r = runner.invoke(main, ["validate", str(bad)])
    assert r.exit_code == 2 and "invalid TOML" in r.output


def test_validate_ok(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(BAD.replace('"two"', "2").replace("widht", "width").replace('"cee"', '"ce"'))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    assert "ok" in r.output


def test_set_override_errors_are_reported(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(BAD.replace('"two"', "2").replace("widht", "width").replace('"cee"', '"ce"'))
    r = CliRunner().invoke(main, ["validate", str(path), "--set", "run.epochs=-1"])
    assert r.exit_code == 2 and "run.epochs" in r.output


def test_plugins_json_shape():
    r = CliRunner().invoke(main, ["plugins", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == {"name", "version", "distribution", "status", "error", "provides", "components"}
        assert all(isinstance(v, list) for v in row["provides"].values())
    by_name = {row["name"]: row for row in rows}
    assert "wrn" in by_name["models"]["provides"]["model"]
    assert by_name["models"]["version"]  # first-party plugins come from the installed distribution


def test_plugins_text_lists_components_and_native_kernel_status():
    from kdtoolkit.quant import native

    r = CliRunner().invoke(main, ["plugins"])
    assert r.exit_code == 0, r.output
    assert "quantizer: hwgq" in r.output and "quantizer: lsq" in r.output
    expected = "available" if native.status()["available"] else "unavailable"
    assert f"native quantizer kernels: {expected} (" in r.output.splitlines()[-1]


def test_eval_of_missing_run_dir(tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output


def test_plot_fusion_writes_png(tmp_path):
    rows = [{"epoch": e, "fusion/stage0/t4": 0.2 + 0.01 * e, "fusion/stage0/t8": 0.8 - 0.01 * e,
             "fusion/stage1/t4": 0.5, "fusion/stage1/t8": 0.5} for e in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["plot-fusion", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["plot-fusion", str(tmp_path / "nothing"), "--out", str(out)])
    assert r.exit_code == 2 and "no metrics" in r.output


BROKEN_SRC = "import kdtoolkit\nraise RuntimeError('boom at import')\n"
BAD_REGISTER_SRC = """
import attrs, kdtoolkit

@attrs.frozen
class Opts:
    role: str = "x"

@kdtoolkit.hookimpl
def register_models(register):
    register("clashing_model", lambda options, *, num_classes: None, options=Opts)
"""
GOOD_SRC = """
import kdtoolkit

@kdtoolkit.hookimpl
def register_schedules(register):
    register("flat", lambda options: (lambda epoch, total: 1.0), description="always 1")
"""


def test_plugins_lists_broken_and_blocked_plugins_and_the_rest(fake_distribution, monkeypatch):
    """A broken plugin used to stop `kdtoolkit plugins` with an error (issue 9)."""
    fake_distribution.install("kdtoolkit-broken", entry_points={"broken": "broken_mod"}, files={"broken_mod.py": BROKEN_SRC})
    fake_distribution.install("kdtoolkit-badreg", entry_points={"badreg": "badreg_mod"}, files={"badreg_mod.py": BAD_REGISTER_SRC})
    fake_distribution.install("kdtoolkit-typo", entry_points={"typo": "typo_mod"},
                              files={"typo_mod.py": "import kdtoolkit\n@kdtoolkit.hookimpl\ndef register_loss(register):\n    pass\n"})
    fake_distribution.install("kdtoolkit-flat", version="1.2", entry_points={"flat": "flat_mod", "off": "flat_mod"},
                              files={"flat_mod.py": GOOD_SRC})
    monkeypatch.setenv("KDTOOLKIT_BLOCK_PLUGINS", "off")
    r = CliRunner().invoke(main, ["plugins"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "broken 0.1.0 (kdtoolkit-broken): broken: plugin 'broken' (from kdtoolkit-broken) failed to import: RuntimeError: boom at import. " \
        "Block it with KDTOOLKIT_BLOCK_PLUGINS=broken or [plugins] blocked = [\"broken\"] in the pipeline" in lines
    assert any(line.startswith("badreg 0.1.0 (kdtoolkit-badreg): broken: plugin 'badreg'") and "'role'" in line for line in lines)
    assert "off 1.2 (kdtoolkit-flat): blocked" in lines
    assert any(line.startswith("typo 0.1.0 (kdtoolkit-typo): broken: plugin 'typo'") and "register_loss" in line for line in lines)
    assert "flat 1.2 (kdtoolkit-flat)" in lines and "  schedule: flat  always 1" in lines
    assert any(line.startswith("  model: wrn ") for line in lines)  # the first-party plugins are still listed
    rows = {row["name"]: row for row in json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)}
    assert rows["broken"]["status"] == "broken" and "boom at import" in rows["broken"]["error"]
    assert rows["off"]["status"] == "blocked" and rows["flat"]["provides"] == {"schedule": ["flat"]}
    assert rows["flat"]["components"] == [{"kind": "schedule", "name": "flat", "description": "always 1"}]
    r = CliRunner().invoke(main, ["describe", "schedule", "flat"])
    assert r.exit_code == 0 and "always 1" in r.output


def test_validate_still_refuses_a_broken_plugin(fake_distribution, tmp_path):
    fake_distribution.install("kdtoolkit-broken", entry_points={"broken": "broken_mod"}, files={"broken_mod.py": BROKEN_SRC})
    path = tmp_path / "ok.toml"
    path.write_text(BAD.replace('"two"', "2").replace("widht", "width").replace('"cee"', '"ce"'))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 2 and "error: plugin 'broken' (from kdtoolkit-broken) failed to import" in r.output
    assert "Traceback" not in r.output


def test_describe_shows_options_types_and_defaults():
    r = CliRunner().invoke(main, ["describe", "model", "wrn"])
    assert r.exit_code == 0, r.output
    assert "model 'wrn' (plugin 'models')" in r.output
    assert "  depth: an integer (default: 16)" in r.output
    assert "generic keys of its table: name, role, frozen, checkpoint" in r.output
    r = CliRunner().invoke(main, ["describe", "quantizer", "lsq"])
    assert "  compute_dtype: one of 'input', 'float32' (default: 'input')" in r.output
    r = CliRunner().invoke(main, ["describe", "loss", "cee"])
    assert r.exit_code == 2 and "unknown loss 'cee' (did you mean 'ce'?)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["describe", "los", "ce"])
    assert r.exit_code == 2 and "did you mean 'loss'" in r.output
