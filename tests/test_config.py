"""Pipeline validation: every problem at once, with TOML key paths, before training."""

import textwrap

import pytest

from kdtoolkit import Pipeline
from kdtoolkit.config import DataConfig, LossConfig, ModelConfig, PipelineConfig, RunConfig, apply_overrides
from kdtoolkit.errors import ConfigError

GOOD = """
schema_version = 1
[run]
name = "t"
epochs = 2
[data]
name = "cifar10"
[models.student]
name = "wrn"
depth = 16
width = 1
[[losses]]
name = "ce"
"""


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(fn):
    with pytest.raises(ConfigError) as err:
        fn()
    return dict(err.value.problems)


def test_good_pipeline_loads(tmp_path):
    pipe = Pipeline.from_toml(write(tmp_path, GOOD))
    assert pipe.config.run.epochs == 2
    assert pipe.config.models["student"].options.depth == 16
    pipe.validate()


def test_three_mistakes_reported_together(tmp_path):
    text = GOOD.replace("epochs = 2", "epochs = \"two\"").replace("width = 1", "widht = 1").replace('name = "ce"', 'name = "cee"')
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, text)))
    assert set(found) == {"run.epochs", "models.student.widht", "losses[0].name"}
    assert "integer" in found["run.epochs"]
    assert "did you mean 'width'" in found["models.student.widht"]
    assert "did you mean 'ce'" in found["losses[0].name"] and "installed:" in found["losses[0].name"]


def test_bad_values_and_literals(tmp_path):
    text = GOOD.replace("epochs = 2", "epochs = 0\nprecision = \"fp8\"").replace("depth = 16", "depth = 17")
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, text)))
    assert "must be > 0" in found["run.epochs"]
    assert "'fp8' is not one of" in found["run.precision"]
    assert any(k.startswith("models.student") and "6n+4" in v for k, v in found.items())


def test_unknown_plugin_lists_installed(tmp_path):
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, GOOD.replace('name = "wrn"', 'name = "resnet"'))))
    assert "unknown model 'resnet'" in found["models.student.name"] and "wrn" in found["models.student.name"]


def test_schema_version_newer_is_refused(tmp_path):
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, GOOD.replace("schema_version = 1", "schema_version = 99"))))
    assert "newer" in found["schema_version"]


def test_cross_table_checks(tmp_path):
    text = GOOD + textwrap.dedent("""
        [[losses]]
        name = "kd"
        inputs = { student = "student", teacher = "nobody", techer = "x" }
        [models.t]
        name = "wrn"
        role = "teacher"
        frozen = true
    """)
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, text)))
    assert "unknown model 'nobody'" in found["losses[1].inputs.teacher"]
    assert "has no input 'techer'" in found["losses[1].inputs.techer"]
    assert "needs pretrained weights" in found["models.t.checkpoint"]


def test_missing_feature_path_lists_near_matches(tmp_path):
    text = GOOD + textwrap.dedent("""
        [models.teacher]
        name = "wrn"
        depth = 16
        width = 2
        role = "teacher"
        [[losses]]
        name = "attention"
        inputs = { student = "student:block2", teacher = "teacher:blok2" }
    """)
    pipe = Pipeline.from_toml(write(tmp_path, text))
    found = problems(pipe.validate)
    msg = found["losses[1].inputs.teacher"]
    assert "blok2" in msg and "block2" in msg


def test_set_overrides(tmp_path):
    pipe = Pipeline.from_toml(write(tmp_path, GOOD), overrides=["run.epochs=5", "models.student.width=2", "run.name=abc", "losses[0].weight=0.5"])
    assert pipe.config.run.epochs == 5 and pipe.config.models["student"].options.width == 2
    assert pipe.config.run.name == "abc" and pipe.config.losses[0].weight == 0.5
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])


def test_python_construction_equals_toml(tmp_path):
    from_toml = Pipeline.from_toml(write(tmp_path, GOOD))
    in_python = Pipeline(
        PipelineConfig(
            run=RunConfig(name="t", epochs=2),
            data=DataConfig(name="cifar10"),
            models={"student": ModelConfig(name="wrn", options={"depth": 16, "width": 1})},
            losses=[LossConfig(name="ce")],
        )
    )
    assert in_python.config == from_toml.config
    # options given as the plugin's own attrs instance work the same
    opts = from_toml.config.models["student"].options
    again = Pipeline(PipelineConfig(data=DataConfig(name="cifar10"), models={"student": ModelConfig(name="wrn", options=opts)}, run=RunConfig(name="t", epochs=2), losses=[LossConfig(name="ce")]))
    assert again.config == from_toml.config


def test_python_construction_is_validated_too():
    found = problems(lambda: Pipeline(PipelineConfig(data=DataConfig(name="cifar10"), models={"student": ModelConfig(name="wrn", options={"depht": 16})})))
    assert "did you mean 'depth'" in found["models.student.depht"]


def test_attrs_validators_print_one_clean_line(tmp_path):
    """attrs' own validators (in_, used by lsq/hwgq) used to print as tuple reprs (issue 9)."""
    import subprocess
    import sys

    text = GOOD.replace("width = 1", 'width = 1\nquantizer = { name = "lsq", weight_bits = 2, act_bits = 2, compute_dtype = "f32" }\nrole = "tutor"')
    proc = subprocess.run([sys.executable, "-m", "kdtoolkit.cli", "validate", str(write(tmp_path, text))],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert "error: models.student.quantizer.compute_dtype: 'compute_dtype' must be in ('input', 'float32') (got 'f32')" in lines
    assert "error: models.student.role: 'tutor' is not one of 'student', 'teacher'" in lines
    assert "Attribute(" not in proc.stderr and len(lines) == 2


def test_validators_of_one_table_all_reported(tmp_path):
    """A bad value is reported even when another key of the same table is also wrong."""
    text = GOOD.replace("epochs = 2", 'epochs = 0\neval_every = -1\nprecision = "fp8"\nseed = "x"')
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, text)))
    assert set(found) == {"run.epochs", "run.eval_every", "run.precision", "run.seed"}
    assert found["run.eval_every"] == "must be > 0, got -1"


def test_plugin_validator_that_reads_the_instance(tmp_path):
    """Validators that look at the instance run when the table is built, reported at their key."""
    text = GOOD.replace('name = "cifar10"', 'name = "cifar10"\ntrain_size = 100\nfraction = 0.5')
    found = problems(lambda: Pipeline.from_toml(write(tmp_path, text)))
    assert "cannot be combined with train_size" in found["data.fraction"]
