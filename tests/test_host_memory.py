"""kdtoolkit.engine.memory: glibc malloc keeps freed tensor memory for reuse (process-wide, so the
page-fault check runs in a child process)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from kdtoolkit.engine import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from kdtoolkit.engine import memory
    from kdtoolkit_plugins.models.wrn import WideResNet

    torch.manual_seed(0)
    if sys.argv[1] == "reuse":
        memory.reuse_freed_memory()
    model = WideResNet(10, 1, num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(4):  # warm-up: the heap grows to the step's peak
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"what": memory.applied(), "faults": faults}))
""")


def run_child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_reuse_removes_the_page_faults_of_training_steps():
    """WRN-10-1 training steps (batch 128) page-fault freed activations back in under glibc's
    default policy; with reuse (nearly) nothing is faulted after warm-up."""
    reuse, system = run_child("reuse"), run_child("system")
    assert reuse["what"].startswith("reuse (glibc mmap threshold")
    assert system["what"] is None
    # over 10 steps: thousands of 4 KiB pages faulted in again by default (about 1,000-5,000 a step,
    # in bursts), a few sporadic ones with reuse
    assert system["faults"] > 3000
    assert reuse["faults"] < system["faults"] / 5


def test_reuse_is_idempotent_and_reported(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    first = memory.reuse_freed_memory()
    assert memory.applied() == first == memory.reuse_freed_memory()
    if not GLIBC:
        assert first.startswith("unchanged")


def test_trainer_applies_the_run_setting(monkeypatch, tmp_path):
    """host_memory = "system" leaves malloc alone; the default asks for reuse."""
    import torch

    from kdtoolkit import Pipeline
    from kdtoolkit.engine import trainer as trainer_module
    from kdtoolkit.engine.distributed import DistInfo

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_memory", lambda: calls.append(1) or "reuse")
    for setting, expected in (("system", 0), ("reuse", 1)):
        calls.clear()
        raw = {
            "run": {"name": "m", "host_memory": setting, "output_dir": str(tmp_path / setting)},
            "data": {"name": "cifar10"},
            "models": {"student": {"name": "wrn", "depth": 10, "width": 1}},
            "method": {"name": "supervised"},
            "losses": [{"name": "ce"}],
        }
        pipe = Pipeline.from_dict(raw)
        from kdtoolkit.engine.build import build_parts

        built = build_parts(pipe.config, pipe.registry, num_classes=10, device=torch.device("cpu"),
                            sample=torch.randn(2, 3, 32, 32))
        trainer_module.Trainer(built, [], [], tmp_path / setting, dist=DistInfo(), raw_config=pipe.raw)
        assert len(calls) == expected, setting
