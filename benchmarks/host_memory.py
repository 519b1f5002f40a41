"""Host memory policy: WRN-16-1 training steps with glibc malloc's default thresholds against
``host_memory = "reuse"`` (``kdtoolkit.engine.memory``), in alternating child processes (the
setting is process-wide and cannot be undone).

    python -m benchmarks.host_memory [--json] [--pairs N] [--steps N]

Each child trains WRN-16-1 (batch 128, random 32x32 images, SGD) for 4 warm-up steps and then
``--steps`` timed steps, and reports images/s, page faults per step and system (kernel) CPU time per
step. ``bf16`` = channels-last + bf16 autocast, ``fp32`` = channels-last float32. Children run in
pairs (system, reuse) ``--pairs`` times; figures are medians, the speed-up the median of the
per-pair ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks._common import REPO, emit, median, parser

CHILD = """
import contextlib, json, resource, sys, time
import torch
import torch.nn.functional as F
from kdtoolkit.engine import memory
from kdtoolkit_plugins.models.wrn import WideResNet

mode, precision, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "reuse":
    memory.reuse_freed_memory()
torch.manual_seed(0)
model = WideResNet(16, 1, num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (128,))
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

def step():
    with autocast():
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

for _ in range(4):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"images_per_s": steps * 128 / (t1 - t0), "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "sys_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / steps, "applied": memory.applied()}))
"""


def child(mode: str, precision: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, precision, str(steps)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precisions", default="bf16,fp32")
    args = p.parse_args(argv)
    print(f"host_memory: {2 * args.pairs} child processes per precision; about 20 minutes on 2 CPU cores with the "
          "defaults (--pairs 1 for about 4)", file=sys.stderr, flush=True)
    figures: dict = {"pairs": args.pairs, "steps": args.steps}
    table = []
    for precision in args.precisions.split(","):
        runs: dict[str, list[dict]] = {"system": [], "reuse": []}
        for _ in range(args.pairs):
            for mode in ("system", "reuse"):
                runs[mode].append(child(mode, precision, args.steps))
        ratios = [r["images_per_s"] / s["images_per_s"] for s, r in zip(runs["system"], runs["reuse"])]
        for mode, rs in runs.items():
            row = {k: median([r[k] for r in rs]) for k in ("images_per_s", "faults_per_step", "sys_ms_per_step")}
            for k, v in row.items():
                figures[f"{precision}/{mode}/{k}"] = round(v, 2)
            table.append((precision, mode, f"{row['images_per_s']:.0f}", f"{row['faults_per_step']:.0f}",
                          f"{row['sys_ms_per_step']:.1f}", f"{median(ratios):.3f}" if mode == "reuse" else ""))
        figures[f"{precision}/speedup"] = round(median(ratios), 3)
    emit(figures, table, ("precision", "host memory", "img/s", "page faults/step", "sys ms/step", "reuse/system"),
         args.json, [f"WRN-16-1, batch 128, {args.pairs} alternating (system, reuse) child pairs of {args.steps} steps; "
                     "medians; speed-up = median of per-pair ratios"])


if __name__ == "__main__":
    main()
