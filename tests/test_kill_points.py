"""A kill at each step of the checkpoint/metrics sequence, then ``--resume``: the final weights,
``best`` and ``metrics.jsonl`` equal those of an uninterrupted run.

The kill is injected (``kdtoolkit.engine.checkpoint.sequence_hook`` calls ``os._exit`` at the named
point, the way SIGKILL ends a process: no cleanup, no flushing of Python state), not timed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdtoolkit.engine.checkpoint import Checkpoint
from kdtoolkit.engine.metrics import MetricsWriter

from conftest import tiny_pipeline

pytestmark = pytest.mark.slow

RUNNER = """
import os, sys
from kdtoolkit.engine import checkpoint
from kdtoolkit.cli import main

point, nth = os.environ.get("KILL_POINT"), int(os.environ.get("KILL_NTH", "1"))
seen = {}

def hook(name):
    if name == point:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == nth:
            os._exit(137)

checkpoint.sequence_hook = hook
sys.argv = ["kdtoolkit", *sys.argv[1:]]
main()
"""

#: (point, occurrence): the second epoch's writes; best's first copy (epoch 1 always improves)
POINTS = [
    ("last.safetensors:written", 2),   # temporary file complete, not renamed
    ("last.safetensors:renamed", 2),   # last is epoch 2, best not copied, no metrics row
    ("best.safetensors:written", 1),   # last is epoch 1, its best copy not renamed
    ("best.safetensors:renamed", 1),   # last and best are epoch 1, no metrics row
    ("metrics.jsonl:row", 2),          # everything of epoch 2 written
]
TIMING = ("train/images_per_s", "train/seconds")


def run(tmp_path: Path, toml: Path, *args, point=None, nth=1):
    import os

    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("KILL_POINT", None)
    if point:
        env.update(KILL_POINT=point, KILL_NTH=str(nth))
    return subprocess.run([sys.executable, str(tmp_path / "runner.py"), "run", str(toml), *args], env=env, capture_output=True, text=True)


def state(run_dir: Path):
    last = Checkpoint(run_dir / "checkpoints" / "last.safetensors")
    best = Checkpoint(run_dir / "checkpoints" / "best.safetensors")
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsWriter(run_dir, "jsonl").read()]
    return last, best, rows


def small(root, run_dir):
    text = tiny_pipeline(root, run_dir, epochs=3)
    return text.replace("train_size = 512", "train_size = 256").replace("test_size = 256", "test_size = 128")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar10_root):
    tmp = tmp_path_factory.mktemp("ref")
    toml = tmp / "p.toml"
    toml.write_text(small(cifar10_root, tmp / "run"))
    r = run(tmp, toml)
    assert r.returncode == 0, r.stderr
    return state(tmp / "run")


@pytest.mark.parametrize("point,nth", POINTS, ids=[p for p, _ in POINTS])
def test_kill_at_each_point_then_resume_is_identical(tmp_path, cifar10_root, reference, point, nth):
    toml = tmp_path / "p.toml"
    toml.write_text(small(cifar10_root, tmp_path / "run"))
    killed = run(tmp_path, toml, point=point, nth=nth)
    assert killed.returncode == 137, killed.stderr
    resumed = run(tmp_path, toml, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref_last, ref_best, ref_rows = reference
    last, best, rows = state(tmp_path / "run")
    assert rows == ref_rows
    for a, b in ((ref_last, last), (ref_best, best)):
        assert a.meta["epoch"] == b.meta["epoch"] and a.meta["best"] == b.meta["best"]
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            if k.startswith("module/"):
                assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert not list((tmp_path / "run").rglob("*.tmp"))
