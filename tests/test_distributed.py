"""Training and evaluation on 2 CPU processes (torchrun, gloo) against 1 process.

Tolerance of "the same weights": the 2-process run averages two half-batch gradients where one
process takes one full-batch gradient, and synchronised BatchNorm sums its statistics in another
order; both are float32 rounding. After 6 steps of SGD the weights agree to ``ATOL`` = 1e-4 (largest
difference measured: supervised 1.6e-5, kd 7.0e-6, CMT-KD 7.7e-6); evaluation counts agree exactly.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import KILLER, tiny_pipeline
from distributed_helpers import (
    RANK_STATE_RUNNER, kdtoolkit, max_abs_diff, student_state, torchrun, torchrun_script, two_nodes,
)
from kdtoolkit.engine.checkpoint import Checkpoint

#: max |w_2proc - w_1proc| after 6 SGD steps (lr 0.1, sync BatchNorm): the 2-process gradient is a sum
#: in another order, and float32 rounding differences grow over the steps. Measured on the merged main
#: (2026-11-30): 3.9e-4 supervised and 2 nodes, 1.1e-3 killed and resumed on one process, 2.6e-6 CMT-KD
#: (float, 1 epoch). A missing or doubled gradient average moves weights by ~1e-2 and more.
ATOL = 3e-3


def pipeline(root: Path, run_dir: Path, *, epochs: int = 2, method: str = "supervised", losses: str | None = None, extra: str = "") -> str:
    text = tiny_pipeline(root, run_dir, epochs=epochs, method=method, losses=losses)
    # the tiny pipeline's [run] table gets the distributed settings; test split: an odd size
    text = text.replace('progress = "off"', 'progress = "off"\nmax_steps_per_epoch = 3\nbatchnorm = "sync"')
    return text.replace("test_size = 256", "test_size = 199").replace("eval_batch_size = 128", "eval_batch_size = 100") + textwrap.dedent(extra)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cifar10_root) -> Path:
    """The supervised tiny pipeline on one process: the reference run (and a frozen KD teacher)."""
    tmp = tmp_path_factory.mktemp("one")
    ok(kdtoolkit("run", str(write(tmp / "p.toml", pipeline(cifar10_root, tmp / "run")))))
    return tmp / "run"


@pytest.mark.slow
def test_supervised_and_kd_two_processes_end_with_the_weights_of_one(tmp_path, cifar10_root, one_process):
    out = tmp_path / "out"
    out.mkdir()
    ok(torchrun(2, "run", str(write(tmp_path / "p.toml", pipeline(cifar10_root, out / "run")))))
    assert sorted(p.name for p in out.iterdir()) == ["run"]  # one run directory, written by rank 0
    assert sorted(p.name for p in (out / "run").iterdir()) == ["checkpoints", "environment.json", "log.txt", "metrics.jsonl", "pipeline.json"]
    diff = max_abs_diff(student_state(out / "run"), student_state(one_process))
    print(f"supervised: max |w2 - w1| = {diff:.3g}")
    assert diff < ATOL
    assert len(metrics(out / "run")) == 2

    kd_losses = """
        [[losses]]
        name = "ce"
        weight = 0.5
        [[losses]]
        name = "kd"
        weight = 0.5
        temperature = 4.0
    """
    teacher = f'[models.teacher]\nname = "wrn"\ndepth = 10\nwidth = 1\nrole = "teacher"\nfrozen = true\ncheckpoint = "{one_process.as_posix()}"\n'
    runs = {}
    for n in (1, 2):
        text = pipeline(cifar10_root, tmp_path / f"kd{n}", method="kd", losses=kd_losses, extra=teacher)
        toml = write(tmp_path / f"kd{n}.toml", text)
        ok(kdtoolkit("run", str(toml)) if n == 1 else torchrun(2, "run", str(toml)))
        runs[n] = tmp_path / f"kd{n}"
    diff = max_abs_diff(student_state(runs[2]), student_state(runs[1]))
    print(f"kd: max |w2 - w1| = {diff:.3g}")
    assert diff < ATOL
    # the frozen teacher is not trained (and not wrapped): unchanged on both
    assert max_abs_diff(student_state(runs[2], model="teacher"), student_state(one_process, "best")) == 0.0


def test_evaluation_on_two_processes_equals_one_exactly(tmp_path, cifar10_root):
    from kdtoolkit import Pipeline

    toml = write(tmp_path / "p.toml", pipeline(cifar10_root, tmp_path / "run", epochs=1).replace("max_steps_per_epoch = 3", "max_steps_per_epoch = 2"))
    Pipeline.from_toml(toml).fit()
    one = json.loads(ok(kdtoolkit("eval", str(tmp_path / "run"), "--json")))
    two = torchrun(2, "eval", str(tmp_path / "run"), "--json")
    two = json.loads(ok(two).strip().splitlines()[-1])  # rank 0 alone prints
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith("/loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7)
        else:
            assert two[key] == one[key], key  # 199 images split 100 + 99: nothing counted twice


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node(tmp_path, cifar10_root, one_process):
    toml = write(tmp_path / "p.toml", pipeline(cifar10_root, tmp_path / "run"))
    for proc in two_nodes("run", str(toml)):
        ok(proc)
    diff = max_abs_diff(student_state(tmp_path / "run"), student_state(one_process))
    print(f"2 nodes: max |w2 - w1| = {diff:.3g}")
    assert diff < ATOL


def cmtkd_toml(root: Path, run_dir: Path, *, epochs: int, student_quantizer: str | None, extra_method: str = "") -> str:
    """Student and 4-/8-bit HWGQ teachers; ``student_quantizer=None``: every network in float."""
    text = textwrap.dedent(f"""
        schema_version = 1
        [run]
        name = "cmtkd"
        seed = 5
        epochs = {epochs}
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        max_steps_per_epoch = 2
        batchnorm = "sync"
        [data]
        name = "cifar10"
        root = "{root.as_posix()}"
        batch_size = 32
        eval_batch_size = 64
        train_size = 256
        test_size = 64
        [models.student]
        name = "wrn"
        depth = 10
        width = 1
        quantizer = {student_quantizer}
        [models.t4]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        quantizer = {{ name = "hwgq", weight_bits = 4, act_bits = 4 }}
        [models.t8]
        name = "wrn"
        depth = 10
        width = 1
        role = "teacher"
        quantizer = {{ name = "hwgq", weight_bits = 8, act_bits = 8 }}
        [method]
        name = "cmtkd"
        feature_loss = "fitnet"
        combine = "importance"
        {extra_method}
        [optimizer]
        lr = 0.05
        weight_decay = 25e-6
    """)
    if student_quantizer is None:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("quantizer ="))
    return text


@pytest.mark.slow
def test_cmtkd_stage_by_stage_under_ddp_equals_one_process(tmp_path, cifar10_root):
    """One DDP over every trained part: the fused teacher pass, the importance weights, the FitNet
    regressors (and their BatchNorms) and the combined-teacher fusion get the gradients of one
    process. Float networks: with 2-bit activations a rounding flipped by float noise between the
    two runs moves a weight by ~1e-3 (measured), which hides nothing but breaks any tolerance."""
    for n in (1, 2):
        toml = write(tmp_path / f"c{n}.toml", cmtkd_toml(cifar10_root, tmp_path / f"c{n}", epochs=1, student_quantizer=None))
        ok(kdtoolkit("run", str(toml)) if n == 1 else torchrun(2, "run", str(toml)))
    one = Checkpoint(tmp_path / "c1" / "checkpoints" / "last.safetensors").module_state
    two = Checkpoint(tmp_path / "c2" / "checkpoints" / "last.safetensors").module_state
    # the FitNet regressors are the feature term's own parameters now (CMT-KD on the loss system)
    trained = [k for k in one if k.startswith(("models.", "method.", "losses."))]
    assert any(k.startswith("method.fusion.") for k in trained) and any(k.startswith("losses.") for k in trained)
    diff = max_abs_diff({k: two[k] for k in trained}, {k: one[k] for k in trained})
    print(f"cmtkd: max |w2 - w1| = {diff:.3g}")
    assert diff < ATOL


def ctkd_toml(root: Path, run_dir: Path, expert: Path) -> str:
    models = "".join(
        f'[models.{name}]\nname = "wrn"\ndepth = 10\nwidth = 1\n{more}'
        for name, more in (("student", ""), ("scratch", 'role = "teacher"\n'),
                           ("expert", f'role = "teacher"\nfrozen = true\ncheckpoint = "{expert.as_posix()}"\n'))
    )
    text = pipeline(root, run_dir, epochs=1, method="ctkd", losses="")
    text = text.replace('[models.student]\nname = "wrn"\ndepth = 10\nwidth = 1\n', models)
    return text.replace('name = "ctkd"\n', 'name = "ctkd"\nshare_first_conv = true\n')


def rank_states(out: Path) -> tuple[dict, dict]:
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cmtkd", "ctkd"])
def test_cmtkd_and_ctkd_run_and_resume_on_two_processes_with_the_ranks_in_step(tmp_path, cifar10_root, method):
    runner = write(tmp_path / "runner.py", RANK_STATE_RUNNER)
    if method == "cmtkd":  # LSQ: quantizer steps initialised from each rank's first batch, then rank 0's
        text = cmtkd_toml(cifar10_root, tmp_path / "run", epochs=1, student_quantizer='{ name = "lsq", weight_bits = 2, act_bits = 2 }')
    else:
        expert = tmp_path / "expert"
        ok(kdtoolkit("run", str(write(tmp_path / "e.toml", pipeline(cifar10_root, expert, epochs=1).replace("[models.student]", "[models.expert]")))))
        text = ctkd_toml(cifar10_root, tmp_path / "run", expert)
    toml = write(tmp_path / "p.toml", text)
    out = tmp_path / "states"
    out.mkdir()
    ok(torchrun_script(2, runner, str(toml), "fresh", str(out)))
    a, b = rank_states(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # every trained module in sync
    ok(torchrun_script(2, runner, str(toml), "resume", str(out), "run.epochs=2"))
    a, b = rank_states(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    saved = Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert saved.meta["epoch"] == 2 and all(torch.equal(saved.module_state[k], a[k]) for k in saved.module_state)


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_stops_the_run_and_resume_on_one_process_completes_it(tmp_path, cifar10_root):
    """Rank 1 is SIGKILLed half-way through epoch 2: the run stops with a message and the epoch-1
    checkpoint intact; resumed on ONE process it ends with the weights of an uninterrupted run."""
    import subprocess
    import sys

    from distributed_helpers import env

    (tmp_path / "killer.py").write_text(KILLER)
    runner = write(tmp_path / "runner.py", RANK_STATE_RUNNER.replace(
        "pipe = Pipeline.from_toml(toml, overrides=sys.argv[4:])",
        "import killer\npipe = Pipeline.from_toml(toml, overrides=sys.argv[4:], plugins=[killer])"))
    texts = {name: pipeline(cifar10_root, tmp_path / name, epochs=2).replace('schedule = { name = "cosine" }', 'schedule = { name = "kill_at" }')
             for name in ("ref", "run")}
    out = tmp_path / "states"
    out.mkdir()
    one_process = [sys.executable, str(runner)]
    ok(subprocess.run(one_process + [str(write(tmp_path / "ref.toml", texts["ref"])), "fresh", str(out)],
                      env=env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=600))
    toml = write(tmp_path / "run.toml", texts["run"])
    killed = torchrun_script(2, runner, str(toml), "fresh", str(out), KILL_AT_EPOCH="1.5", KILL_RANK="1", PYTHONPATH=str(tmp_path))
    assert killed.returncode != 0
    assert "another process of the run failed" in killed.stderr and "continue with --resume" in killed.stderr, killed.stderr[-3000:]
    last = Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")  # intact, readable
    assert last.meta["epoch"] == 1
    ok(subprocess.run(one_process + [str(toml), "resume", str(out)], env=env(PYTHONPATH=str(tmp_path)),
                      capture_output=True, text=True, timeout=600))
    assert Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["epoch"] == 2
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1, 2]
    diff = max_abs_diff(student_state(tmp_path / "run"), student_state(tmp_path / "ref"))
    print(f"2 processes, killed, resumed on 1: max |w - w_ref| = {diff:.3g}")
    assert diff < ATOL


@pytest.mark.slow
def test_batch_size_must_divide_over_the_processes(tmp_path, cifar10_root):
    text = pipeline(cifar10_root, tmp_path / "run", epochs=1).replace("batch_size = 64", "batch_size = 63")
    proc = torchrun(2, "run", str(write(tmp_path / "p.toml", text)), timeout=300)
    assert proc.returncode != 0
    assert "error: data.batch_size: 63 is the global batch" in proc.stderr
    assert "kdtoolkit/" not in proc.stderr  # no traceback through our code (torchrun prints its own summary)
    assert not (tmp_path / "run").exists()


def test_python_caller_under_torchrun_without_process_group_refuses(tmp_path, cifar10_root, monkeypatch):
    from kdtoolkit import Pipeline
    from kdtoolkit.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    pipe = Pipeline.from_toml(write(tmp_path / "p.toml", pipeline(cifar10_root, tmp_path / "run", epochs=1)))
    with pytest.raises(ConfigError, match="no process group"):
        pipe.fit()
    assert not (tmp_path / "run").exists()
    assert os.environ["WORLD_SIZE"] == "2"


CLI_WITH_KILLER = '''
import sys, killer
import kdtoolkit.plugins as plugins
_get = plugins.get_plugin_manager
plugins.get_plugin_manager = lambda *a, plugins=(), **k: _get(*a, plugins=[*plugins, killer], **k)
from kdtoolkit.cli import main
main(sys.argv[1:])
'''


@pytest.mark.slow
def test_torchrun_max_restarts_continues_the_run_by_itself(tmp_path, cifar10_root):
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed in epoch 2; the restarted worker group meets
    again (its own store prefix: the failed group's connection keys are still in the agent's store),
    resumes from the epoch-1 checkpoint without --resume, and ends like an uninterrupted 2-process run."""
    import sys

    from distributed_helpers import torchrun_args, env

    (tmp_path / "killer.py").write_text(KILLER)
    cli = write(tmp_path / "cli.py", CLI_WITH_KILLER)
    texts = {name: pipeline(cifar10_root, tmp_path / name, epochs=3).replace('schedule = { name = "cosine" }', 'schedule = { name = "kill_at" }')
             for name in ("ref", "run")}
    import subprocess

    def launch(name, **extra):
        cmd = torchrun_args(2, max_restarts=1) + [str(cli), "run", str(write(tmp_path / f"{name}.toml", texts[name]))]
        return subprocess.run(cmd, env=env(PYTHONPATH=str(tmp_path), **extra), capture_output=True, text=True, timeout=600)

    ok(launch("ref"))
    restarted = launch("run", KILL_AT_EPOCH="1.5", KILL_RANK="1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout + restarted.stderr
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert Checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["epoch"] == 3
    diff = max_abs_diff(student_state(tmp_path / "run"), student_state(tmp_path / "ref"))
    print(f"killed, restarted by torchrun: max |w - w_ref| = {diff:.3g}")
    assert diff < ATOL
