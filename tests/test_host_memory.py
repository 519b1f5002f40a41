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


def test_cli_run_applies_the_run_setting(monkeypatch, tmp_path):
    """host_memory = "system" leaves malloc alone; the default asks for reuse (the CLI's `run`
    applies it: a process-wide setting is the application's, not the library's)."""
    from click.testing import CliRunner

    from kdtoolkit import Pipeline
    from kdtoolkit import cli as cli_module

    calls = []
    monkeypatch.setattr(cli_module, "reuse_freed_memory", lambda: calls.append(1) or "reuse")
    monkeypatch.setattr(Pipeline, "validate", lambda self, **kw: None)
    monkeypatch.setattr(Pipeline, "fit", lambda self, **kw: {"best": None, "run_dir": "x"})
    for setting, expected in (("system", 0), ("reuse", 1)):
        calls.clear()
        path = tmp_path / f"{setting}.toml"
        path.write_text(
            f'[run]\nname = "m"\nhost_memory = "{setting}"\noutput_dir = "{(tmp_path / setting).as_posix()}"\n'
            '[data]\nname = "cifar10"\n[models.student]\nname = "wrn"\ndepth = 10\nwidth = 1\n'
            '[method]\nname = "supervised"\n[[losses]]\nname = "ce"\n'
        )
        result = CliRunner().invoke(cli_module.main, ["run", str(path)])
        assert result.exit_code == 0, result.output
        assert len(calls) == expected, setting
