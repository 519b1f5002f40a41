"""A run you can watch: the start-up banner, progress lines when the output is not a terminal, the
console kept in log.txt, `kdtoolkit status`, and a best checkpoint without optimizer state."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from kdtoolkit.cli import main
from kdtoolkit.engine import output
from kdtoolkit.engine.checkpoint import Checkpoint

PIPELINE = """
schema_version = 1
[run]
name = "watch"
epochs = 2
max_steps_per_epoch = 4
output_dir = "{run_dir}"
[data]
name = "cifar10_sample"
batch_size = 32
eval_batch_size = 128
train_size = 256
test_size = 128
[models.student]
name = "wrn"
depth = 10
width = 1
[[losses]]
name = "ce"
[optimizer]
schedule = {{ name = "cosine" }}
"""


@pytest.fixture(scope="module")
def redirected_run(tmp_path_factory):
    """`kdtoolkit run` with stdout and stderr going to a file (as under nohup or a scheduler), with a
    progress line due at every step."""
    tmp = tmp_path_factory.mktemp("watch")
    run_dir = tmp / "run"
    toml = tmp / "watch.toml"
    toml.write_text(PIPELINE.format(run_dir=run_dir.as_posix()))
    env = dict(os.environ, **{output.LINE_INTERVAL_ENV: "0"})
    with open(tmp / "console.txt", "w") as console:
        proc = subprocess.run([sys.executable, "-m", "kdtoolkit.cli", "run", str(toml)], stdout=console,
                              stderr=subprocess.STDOUT, env=env, timeout=600)
    text = (tmp / "console.txt").read_text()
    assert proc.returncode == 0, text
    return run_dir, text


def test_banner_comes_first_and_says_what_runs_where(redirected_run):
    run_dir, text = redirected_run
    lines = text.splitlines()
    assert lines[0].startswith("kdtoolkit ") and "run 'watch'" in lines[0] and "2 epochs x 4 steps" in lines[0]
    banner = "\n".join(lines[:6])
    assert re.search(r"model student: wrn\(depth=10, width=1.*\): student; 77\.8k parameters; float", banner)
    assert "data: cifar10_sample (train_size=256, test_size=128): 256 train / 128 test images" in banner
    assert "device: cpu" in banner and "precision fp32" in banner
    assert f"run directory: {run_dir}" in banner


def test_progress_lines_without_a_terminal(redirected_run):
    _, text = redirected_run
    progress = [line for line in text.splitlines() if line.startswith("epoch 1/2 step")]
    assert len(progress) == 3  # a line at steps 1..3 (the 4th ends the epoch: the epoch line says it)
    assert re.fullmatch(r"epoch 1/2 step 1/4 \(25%\) \d+ img/s eta \d:\d\d:\d\d \(run \d:\d\d:\d\d\) "
                        r"elapsed \d:\d\d:\d\d ce=\d\.\d{4} total=\d\.\d{4}", progress[0])
    assert text.index(progress[-1]) < text.index("epoch 1: ce=")
    assert "\r" not in text and "\x1b" not in text


def test_log_txt_keeps_the_console(redirected_run):
    run_dir, text = redirected_run
    log = (run_dir / "log.txt").read_text()
    assert log.startswith("kdtoolkit ") and "epoch 2: ce=" in log
    assert log in text  # the same text; the console has the CLI's closing lines besides
    assert not (run_dir / output.RUNNING_FILE).exists()


def test_best_checkpoint_holds_no_optimizer_state(redirected_run):
    run_dir, _ = redirected_run
    best, last = run_dir / "checkpoints" / "best.safetensors", run_dir / "checkpoints" / "last.safetensors"
    with safe_open(str(best), framework="pt") as f:
        assert not [k for k in f.keys() if not k.startswith("module/")]
    assert "optimizer" not in Checkpoint(best).meta and Checkpoint(last).optimizer_state() is not None
    assert Checkpoint(best).module_state.keys() == Checkpoint(last).module_state.keys()
    # SGD momentum doubles the tensors: best is about half of last
    assert best.stat().st_size < 0.6 * last.stat().st_size
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in metrics if r["epoch"] == Checkpoint(best).meta["best"]["epoch"])
    result = CliRunner().invoke(main, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["test/student/top1"] == logged["test/student/top1"]


def test_status_of_a_finished_run(redirected_run):
    run_dir, _ = redirected_run
    result = CliRunner().invoke(main, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "run 'watch', finished" in result.output
    assert "epochs: 2 of 2 checkpointed" in result.output
    assert re.search(r"best: test/student/top1 = \d+\.\d\d \(epoch \d\)", result.output)
    assert "log.txt" in result.output and "epoch 2: ce=" in result.output


def test_status_tells_running_from_killed(redirected_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(redirected_run[0], run_dir)
    marker = run_dir / output.RUNNING_FILE
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert f"running (pid {os.getpid()})" in CliRunner().invoke(main, ["status", str(run_dir)]).output
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marker.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    out = CliRunner().invoke(main, ["status", str(run_dir)]).output
    assert "not running: stopped before the end (killed or crashed)" in out


def test_status_of_a_directory_that_is_no_run(tmp_path):
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path}: not a run directory (no pipeline.json)"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_lines_come_every_interval(monkeypatch):
    """Lines mode: one line per elapsed interval, with images/s from the step's batch size and the ETA
    of the pass and of the run."""
    clock = Clock()
    monkeypatch.setattr(output.time, "perf_counter", clock)
    monkeypatch.setenv(output.LINE_INTERVAL_ENV, "30")
    stream = io.StringIO()
    bar = output.ProgressBar(100, "epoch 1/2", enabled="lines", stream=stream, images_per_step=64, steps_after=100)
    for _ in range(20):  # 20 steps, 4 s each: lines at 32 s and 64 s
        clock.now += 4.0
        bar.update(1, postfix=lambda: "ce=1.0000")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "epoch 1/2 step 8/100 (8%) 16 img/s eta 0:06:08 (run 0:12:48) elapsed 0:00:32 ce=1.0000",
        "epoch 1/2 step 16/100 (16%) 16 img/s eta 0:05:36 (run 0:12:16) elapsed 0:01:04 ce=1.0000",
    ]
    bar.close()
    assert stream.getvalue().count("\n") == 2


def test_a_terminal_gets_the_bar_and_the_log_gets_lines(monkeypatch, tmp_path):
    clock = Clock()
    monkeypatch.setattr(output.time, "perf_counter", clock)
    monkeypatch.setenv(output.LINE_INTERVAL_ENV, "30")
    terminal = io.StringIO()
    with output.RunConsole(terminal, tmp_path) as console:
        assert json.loads((tmp_path / output.RUNNING_FILE).read_text())["pid"] == os.getpid()
        print("banner", file=console)
        bar = output.ProgressBar(10, "epoch 1/1", enabled="bar", stream=console)
        for _ in range(10):
            clock.now += 5.0
            bar.update(1)
        bar.close()
    log = (tmp_path / output.LOG_FILE).read_text()
    assert log.splitlines()[0] == "banner" and len(log.splitlines()) == 1 + 1  # banner, the line at 30 s
    assert log.splitlines()[1].startswith("epoch 1/1 step 6/10 (60%)")
    assert "\r" not in log and "\r" in terminal.getvalue() and "step 6/10" not in terminal.getvalue()
    assert not (tmp_path / output.RUNNING_FILE).exists()


@pytest.mark.parametrize("setting,tty,mode", [("auto", True, "bar"), ("auto", False, "lines"), ("on", False, "bar"),
                                              ("off", True, "")])
def test_progress_mode(setting, tty, mode):
    stream = io.StringIO()
    stream.isatty = lambda: tty
    assert output.progress_enabled(setting, stream) == mode
