"""Launching pipelines on several CPU processes (gloo) for the distributed tests: torchrun, free
ports, a timeout on every subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from kdtoolkit.engine.checkpoint import Checkpoint

TIMEOUT = 600  # seconds, per launch: the machine is shared and slow; a hang must still end

#: a torchrun entry script: the pipeline's fit inside the process group, then each rank's full
#: state (every parameter and buffer) to OUT/rank<r>.safetensors, to check the ranks agree
RANK_STATE_RUNNER = '''
import os, sys
import torch
from safetensors.torch import save_file
from kdtoolkit import Pipeline
from kdtoolkit.engine.distributed import process_group

toml, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = Pipeline.from_toml(toml, overrides=sys.argv[4:])
with process_group("cpu") as info:
    pipe.fit(resume=mode == "resume")
    state = {k: v.detach().clone().contiguous() for k, v in pipe._built.module.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{info.rank}.safetensors"))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(OMP_NUM_THREADS="1", **extra)
    return out


def kdtoolkit(*args: str, timeout: int = TIMEOUT, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m kdtoolkit ARGS`` in one process."""
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def torchrun_args(nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None, max_restarts: int = 0) -> list[str]:
    port = port or free_port()
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5"]
    if nnodes == 1:
        args += ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    else:
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                 "--rdzv-id=kdtoolkit-test"]
    return args


def torchrun(nproc: int, *args: str, timeout: int = TIMEOUT, max_restarts: int = 0, **extra_env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC -m kdtoolkit ARGS`` on a free rendezvous port."""
    cmd = torchrun_args(nproc, max_restarts=max_restarts) + ["-m", "kdtoolkit", *args]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def torchrun_script(nproc: int, script: Path, *args: str, timeout: int = TIMEOUT, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = torchrun_args(nproc) + [str(script), *args]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def two_nodes(*args: str, nproc_per_node: int = 1, timeout: int = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Two ``torchrun --nnodes 2`` launches on localhost meeting at one rendezvous endpoint."""
    port = free_port()
    procs = [
        subprocess.Popen(torchrun_args(nproc_per_node, nnodes=2, node_rank=r, port=port) + ["-m", "kdtoolkit", *args],
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def student_state(run_dir: Path, checkpoint: str = "last", model: str = "student") -> dict[str, torch.Tensor]:
    return Checkpoint(run_dir / "checkpoints" / f"{checkpoint}.safetensors").model_state(model)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
