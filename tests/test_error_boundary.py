"""The CLI's error boundary: anticipated failures are one line with the key path or file and exit 2;
anything else is a bug (one line, exit 1, the traceback only with --debug); nothing is written to a
run directory before validation passed."""

from __future__ import annotations

import errno
import json
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdtoolkit.cli import main
from conftest import tiny_pipeline


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    # (a run's banner may come first); from the first error on, only error lines
    assert first is not None and all(line.startswith("error: ") for line in lines[first:]), r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- reading the file and --set --------------------------------------------------------------------


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'schema_version = 1\n[run]\nname = "\xff\xfe"\n')
    assert_user_error(invoke("validate", path), str(path), "UTF-8")


def test_deeply_nested_toml_is_a_user_error(tmp_path):
    path = write(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_user_error(invoke("validate", path), str(path), "nested")
    path = write(tmp_path, "[data]\nname = 'cifar10'\n[models.s]\nname = 'wrn'\nx = " + "{a = " * 100 + "1" + "}" * 100 + "\n")
    assert_user_error(invoke("validate", path), str(path), "nested")


@pytest.mark.parametrize("item", ["=5", ".=5", "run..epochs=5"])
def test_set_without_a_key_path_is_an_error(tmp_path, cifar10_root, item):
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run"))
    assert_user_error(invoke("validate", path, "--set", item), "--set", "bad key path")


def test_set_value_that_is_not_toml_is_an_error_not_a_string(tmp_path, cifar10_root):
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run"))
    assert_user_error(invoke("validate", path, "--set", 'run.name="abc'), "run.name", "not a TOML value")
    # a bare word stays a convenient string
    r = invoke("validate", path, "--set", "run.name=abc")
    assert r.exit_code == 0, r.output


# --- values accepted with the wrong meaning --------------------------------------------------------

BAD_VALUES = [
    ("[method]\nlr = 3\n", "method.name", "required"),
    ("[run]\nseed = 100000000000000000000000000000\n", "run.seed", "2**63"),
    ('[run]\nname = "a\\u0000b"\n', "run.name", "printable"),
    ('[run]\nname = "' + "x" * 300 + '"\n', "run.name", "printable"),
    ('[run]\noutput_dir = "runs/{nam}"\n', "run.output_dir", "{name}"),
    ('[run]\noutput_dir = "runs/{0}"\n', "run.output_dir", "{name}"),
    ('[run]\noutput_dir = "runs/{"\n', "run.output_dir", "{name}"),
    ("[optimizer]\nname = 'adam'\nbetas = [-0.1, 2.0]\n", "optimizer.betas", "[0, 1)"),
    ("[[optimizer.param_groups]]\nparams = ['models.*']\nlr_scale = -1.0\n", "optimizer.param_groups[0].lr_scale", ">= 0"),
    ("[[optimizer.param_groups]]\nparams = ['models.*']\nweight_decay = -1.0\n", "optimizer.param_groups[0].weight_decay", ">= 0"),
    ("[optimizer.schedule]\nname = 'multistep'\nmilestones = [-2, 1]\n", "optimizer.schedule.milestones", ">= 0"),
]


@pytest.mark.parametrize("snippet,path,needle", BAD_VALUES, ids=[b[1] + str(i) for i, b in enumerate(BAD_VALUES)])
def test_values_with_a_wrong_meaning_are_refused(tmp_path, snippet, path, needle):
    base = textwrap.dedent("""
        schema_version = 1
        [data]
        name = "cifar10"
        [models.student]
        name = "wrn"
        depth = 10
        width = 1
    """)
    toml = base + snippet
    # the snippet's table may repeat one of the base's: merge by putting the snippet first
    if snippet.startswith("[run]") or snippet.startswith("[method]") or snippet.startswith("[optimizer") or snippet.startswith("[[optimizer"):
        toml = "schema_version = 1\n" + snippet + base.replace("schema_version = 1", "")
    r = invoke("validate", write(tmp_path, toml))
    assert_user_error(r, path, needle)


def test_method_table_without_name_is_not_silently_supervised(tmp_path, cifar10_root):
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run").replace('[method]\nname = "supervised"', "[method]\n"))
    assert_user_error(invoke("validate", path), "method.name")


def test_model_named_empty_string(tmp_path):
    toml = 'schema_version = 1\n[data]\nname = "cifar10"\n[models.""]\nname = "wrn"\ndepth = 10\nwidth = 1\n'
    assert_user_error(invoke("validate", write(tmp_path, toml)), "models")


@pytest.mark.parametrize("bits", [-1, 0, 9, 33])
def test_quantizer_override_bits(tmp_path, cifar10_root, bits):
    extra = f"""
        [[models.student.quantizer.overrides]]
        pattern = "block1.*"
        weight_bits = {bits}
    """
    toml = tiny_pipeline(cifar10_root, tmp_path / "run").replace(
        "width = 1\n", 'width = 1\nquantizer = { name = "lsq", weight_bits = 2, act_bits = 2, overrides = [{ pattern = "block1.*", weight_bits = %d }] }\n' % bits, 1
    )
    assert_user_error(invoke("validate", write(tmp_path, toml)), "models.student.quantizer.overrides[0].weight_bits")


# --- the file system -------------------------------------------------------------------------------


def _no_data(monkeypatch):
    """``run`` stops right after the run directory checks (the build is not needed to test them)."""
    from kdtoolkit.pipeline import Pipeline

    def build(self, device=None):
        raise RuntimeError("build reached")

    monkeypatch.setattr(Pipeline, "build", build)


def test_file_valued_output_dir(tmp_path, cifar10_root):
    target = tmp_path / "afile"
    target.write_text("x")
    path = write(tmp_path, tiny_pipeline(cifar10_root, target))
    assert_user_error(invoke("run", path), "run.output_dir", "not a directory")
    assert target.read_text() == "x"


def test_read_only_output_dir(tmp_path, cifar10_root, monkeypatch):
    run = tmp_path / "ro" / "run"
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):  # a read-only file system (tests may run as root: no chmod)
        if self == run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    path = write(tmp_path, tiny_pipeline(cifar10_root, run))
    assert_user_error(invoke("run", path), "run.output_dir", str(run), "Read-only")


def test_full_disk_while_checkpointing_names_the_file_and_keeps_the_last_checkpoint(tmp_path, cifar10_root, monkeypatch):
    from kdtoolkit.engine import checkpoint

    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run", epochs=2))
    real = checkpoint.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # epoch 1: last, best; epoch 2: last
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    r = invoke("run", path)
    assert_user_error(r, "last.safetensors", "No space left on device")
    ckpt = checkpoint.Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert ckpt.meta["epoch"] == 1
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# --- plugins and memory ----------------------------------------------------------------------------


def _with_plugin(monkeypatch, plugin):
    from kdtoolkit import plugins

    real = plugins._load_entrypoints

    def load(pm, *args, **kwargs):
        real(pm, *args, **kwargs)
        pm.register(plugin, name="broken_plugin")

    monkeypatch.setattr(plugins, "_load_entrypoints", load)


def test_plugin_raising_in_its_register_hook(tmp_path, cifar10_root, monkeypatch):
    import kdtoolkit

    class Broken:
        @kdtoolkit.hookimpl
        def register_losses(self, register):
            raise ValueError("boom")

    _with_plugin(monkeypatch, Broken())
    r = invoke("validate", write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run")))
    assert_user_error(r, "broken_plugin", "register_losses", "boom")


def test_plugin_hook_with_a_misspelled_argument(tmp_path, cifar10_root, monkeypatch):
    import kdtoolkit

    class Misspelled:
        @kdtoolkit.hookimpl
        def register_losses(self, regster):
            pass

    _with_plugin(monkeypatch, Misspelled())
    r = invoke("validate", write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run")))
    assert_user_error(r, "plugin", "regster")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4398046511104 bytes"),
    MemoryError(),
], ids=["cuda", "cpu", "python"])
def test_out_of_memory_while_building(tmp_path, cifar10_root, monkeypatch, error):
    from kdtoolkit.engine import assemble

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(assemble, "build_model", oom)
    r = invoke("validate", write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run")))
    assert_user_error(r, "out of memory")


# --- bugs ------------------------------------------------------------------------------------------


def test_a_bug_is_one_line_exit_1_and_the_traceback_only_with_debug(tmp_path, cifar10_root, monkeypatch):
    from kdtoolkit.pipeline import Pipeline

    def validate(self, full=False):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Pipeline, "validate", validate)
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run"))
    r = invoke("validate", path)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "internal error" in r.output and "ZeroDivisionError: a bug" in r.output and "--debug" in r.output
    r = invoke("--debug", "validate", path)
    assert r.exit_code == 1 and "Traceback" in r.output


# --- the run directory -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["checkpoints/best.safetensors", "metrics.jsonl", "metrics.csv"])
def test_any_run_content_is_never_overwritten_without_resume(tmp_path, cifar10_root, monkeypatch, content):
    _no_data(monkeypatch)
    run = tmp_path / "run"
    (run / content).parent.mkdir(parents=True, exist_ok=True)
    (run / content).write_text("keep")
    r = invoke("run", write(tmp_path, tiny_pipeline(cifar10_root, run)))
    assert_user_error(r, str(run), "--resume")
    assert (run / content).read_text() == "keep"
    assert sorted(p.name for p in run.iterdir()) == [Path(content).parts[0]]


def test_nothing_is_written_before_validation_passed(tmp_path, cifar10_root):
    # a feature reference that only validate() can check: run must stop before making the directory
    losses = '[[losses]]\nname = "ce"\n[[losses]]\nname = "attention"\ninputs = { student = "student:no.such", teacher = "student:stages" }\n'
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run", losses=losses))
    r = invoke("run", path)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_feature_shapes_refused_by_a_loss_setup_are_a_user_error(tmp_path, cifar10_root):
    losses = '[[losses]]\nname = "ce"\n[[losses]]\nname = "attention"\ninputs = { student = "student:block1", teacher = "student:block3" }\n'
    path = write(tmp_path, tiny_pipeline(cifar10_root, tmp_path / "run", losses=losses))
    r = invoke("run", path)
    assert_user_error(r, "losses[1]", "spatial sizes differ")
    assert not (tmp_path / "run").exists()


def test_eval_and_export_with_a_pipeline_json_that_no_longer_matches_the_checkpoint(tmp_path, cifar10_root):
    """A run directory whose pipeline.json was edited (here: a wider model) is the user's doing:
    ``eval`` and ``export`` name the checkpoint and exit 2, they do not crash in load_state_dict."""
    run_dir = tmp_path / "run"
    path = write(tmp_path, tiny_pipeline(cifar10_root, run_dir, epochs=1))
    r = invoke("run", path, "--set", "run.max_steps_per_epoch=1")
    assert r.exit_code == 0, r.output
    assert invoke("eval", run_dir).exit_code == 0
    recorded = json.loads((run_dir / "pipeline.json").read_text())
    recorded["models"]["student"]["width"] = 2
    (run_dir / "pipeline.json").write_text(json.dumps(recorded))
    best = str(run_dir / "checkpoints" / "best.safetensors")
    assert_user_error(invoke("eval", run_dir), best, "does not match this pipeline")
    assert_user_error(invoke("export", run_dir, "--out", tmp_path / "m.onnx", "--format", "onnx"), best, "does not match")
    del recorded["models"]["student"]["width"]
    recorded["models"]["student"]["depth"] = 16  # more layers: tensors missing from the checkpoint
    (run_dir / "pipeline.json").write_text(json.dumps(recorded))
    assert_user_error(invoke("eval", run_dir), best, "missing")
