"""kdtoolkit.engine.memory: glibc malloc keeps freed tensor memory for reuse. The page faults and
speed it saves are measured by ``python -m benchmarks.host_memory``, not by a test."""

from __future__ import annotations

import platform

from kdtoolkit.engine import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


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
    monkeypatch.setattr(cli_module, "_print_summary", lambda run_dir, seconds: None)
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
