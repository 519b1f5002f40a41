"""Until multi-process training is supported, a run under torchrun (WORLD_SIZE > 1) refuses."""

import subprocess
import sys

from conftest import tiny_pipeline


def test_world_size_above_one_refuses_with_one_line(tmp_path, cifar10_root):
    toml = tmp_path / "p.toml"
    toml.write_text(tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1))
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "kdtoolkit", "run", str(toml)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: WORLD_SIZE=2") and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
