"""Data-parallel scaling: the same pipeline (WRN-16-1, ``supervised``, one global batch) on one
process and on N processes started by ``torchrun`` (gloo on the CPU, NCCL with ``--device cuda``),
in alternating rounds. Reports training images/s (global: every process's images over rank 0's
epoch time, the second epoch so start-up is left out) and the scaling efficiency
``(images/s of N) / (N x images/s of 1)``.

    python -m benchmarks.distributed_throughput [--nproc 2] [--device cpu|cuda] [--steps 10] [--rounds 2] [--json]

On the CPU the processes share the machine's cores: each of the N processes gets cores / N ``torch``
threads and so does the one process (``--baseline-threads`` to change it), so the efficiency measures
the cost of the split and of the gradient all-reduce with the same hardware per process. (On a loaded
machine one process with every core can be far slower than its share suggests: OpenMP threads wait
for each other whenever one is descheduled.) On a GPU machine (``--device cuda``) each process has
its GPU and the one process one GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks._common import default_cifar10_root, emit, median, parser

TIMEOUT = 1800


def pipeline(root: str | None, run_dir: Path, *, device: str, steps: int, batch: int, batchnorm: str) -> str:
    data_root = f'root = "{root}"\n' if root else ""
    return textwrap.dedent(f"""
        schema_version = 1
        [run]
        name = "dist-bench"
        epochs = 2
        eval_every = 1000
        device = "{device}"
        output_dir = "{run_dir.as_posix()}"
        progress = "off"
        max_steps_per_epoch = {steps}
        batchnorm = "{batchnorm}"
        [data]
        name = "cifar10"
        batch_size = {batch}
        eval_batch_size = 256
        test_size = 64
        train_size = {max(batch * steps, 1024)}
        {data_root}
        [models.student]
        name = "wrn"
        depth = 16
        width = 1
        [[losses]]
        name = "ce"
        [optimizer]
        lr = 0.1
    """)


def launch(nproc: int, toml: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "kdtoolkit", "run", str(toml)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "kdtoolkit", "run", str(toml)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (toml.parent / toml.stem / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["train/images_per_s"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=10, help="training steps per epoch (2 epochs per launch)")
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batchnorm", choices=("local", "sync"), default="local")
    p.add_argument("--baseline-threads", type=int, default=None, help="torch threads of the one process (default: cores / nproc)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    root = default_cifar10_root()
    figures: dict[str, list[float]] = {"1": [], str(args.nproc): []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in (1, args.nproc):
                toml = Path(tmp) / f"r{r}n{n}.toml"
                toml.write_text(pipeline(root, toml.parent / toml.stem, device=args.device, steps=args.steps, batch=args.batch,
                                         batchnorm=args.batchnorm))
                share = max(cores // args.nproc, 1)
                threads = (args.baseline_threads or share) if n == 1 else share
                figures[str(n)].append(launch(n, toml, threads))
    one, many = median(figures["1"]), median(figures[str(args.nproc)])
    backend = "nccl" if args.device == "cuda" else "gloo"
    result = {"baseline_threads": args.baseline_threads or max(cores // args.nproc, 1), "device": args.device, "backend": backend, "nproc": args.nproc, "global_batch": args.batch, "cores": cores,
              "batchnorm": args.batchnorm, "images_per_s_1": one, f"images_per_s_{args.nproc}": many,
              "speedup": many / one, "scaling_efficiency": many / (args.nproc * one), "rounds": figures}
    table = [("1 process", f"{one:.1f}", "1.00", "-"),
             (f"{args.nproc} processes ({backend})", f"{many:.1f}", f"{many / one:.2f}", f"{many / (args.nproc * one):.2f}")]
    notes = [f"WRN-16-1, global batch {args.batch}, {args.steps} steps/epoch, median of {args.rounds} rounds; "
             f"{cores} CPU cores, {max(cores // args.nproc, 1)} torch thread(s) per process, one process "
             f"{args.baseline_threads or max(cores // args.nproc, 1)}" + (" (the cores are shared with whatever else runs here)" if args.device == "cpu" else "")]
    emit(result, table, ("run", "images/s", "speed-up", "scaling efficiency"), args.json, notes)


if __name__ == "__main__":
    main()
