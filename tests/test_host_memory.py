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
