"""CMT-KD at reduced scale: the paper's Table 2 pipelines (a W2A2 HWGQ single model, and the full
CMT-KD with 4/6/8-bit teachers) shrunk to run on a CPU, to check that the method helps the student.

    python -m benchmarks.cmtkd_reduced [--json] [--epochs 5] [--train-size 10000] [--seeds 0,1]

Both pipelines are read from ``examples/cmtkd`` (``cifar100_resnet18_single_w2a2.toml`` and
``cifar100_resnet18_cmtkd.toml``) and changed only in scale: every model becomes WRN-16-1, the data
CIFAR-10 (the first ``--train-size`` training images, the whole test set) under
``$KDTOOLKIT_DATA`` (or the exact subset beside the repository), ``--epochs`` epochs with a cosine
schedule instead of the 120-epoch step schedule, bf16 autocast + channels-last. Everything else
(HWGQ bit-widths, α, β, γ, temperature, π learning rate, weight decays) is the example's. Prints
the student's final top-1 per seed, and CMT-KD's combined teacher.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path

from benchmarks._common import REPO, default_cifar10_root, emit, median, parser
from kdtoolkit import Pipeline

EXAMPLES = REPO / "examples" / "cmtkd"
PIPELINES = {"single W2A2": "cifar100_resnet18_single_w2a2.toml", "CMT-KD W2A2": "cifar100_resnet18_cmtkd.toml"}


def reduced(raw: dict, *, root: str | None, epochs: int, train_size: int, seed: int, out: Path) -> dict:
    for spec in raw["models"].values():
        spec["name"], spec["depth"], spec["width"] = "wrn", 16, 1
    raw["data"] = {"name": "cifar10", "batch_size": 128, "train_size": train_size, "download": False}
    if root:
        raw["data"]["root"] = root
    raw["run"].update(epochs=epochs, seed=seed, precision="bf16", channels_last=True, progress="off",
                      output_dir=str(out), name=out.name)
    raw["optimizer"]["schedule"] = {"name": "cosine"}
    return raw


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    root = os.environ.get("KDTOOLKIT_DATA") or default_cifar10_root()
    seeds = [int(s) for s in args.seeds.split(",")]
    figures: dict = {"epochs": args.epochs, "train_size": args.train_size, "root": root}
    table = []
    with tempfile.TemporaryDirectory(prefix="kdtoolkit-cmtkd-reduced-") as tmp:
        for label, file in PIPELINES.items():
            tops, combined = [], []
            for seed in seeds:
                raw = tomllib.loads((EXAMPLES / file).read_text())
                raw = reduced(raw, root=root, epochs=args.epochs, train_size=args.train_size, seed=seed,
                              out=Path(tmp) / f"{Path(file).stem}-{seed}")
                last = Pipeline.from_dict(raw).fit()["last"]
                tops.append(last["test/student/top1"])
                if "test/combined_teacher/top1" in last:
                    combined.append(last["test/combined_teacher/top1"])
                figures[f"{label}/seed{seed}/student_top1"] = tops[-1]
            table.append((label, " / ".join(f"{t:.2f}" for t in tops), f"{median(tops):.2f}",
                          " / ".join(f"{t:.2f}" for t in combined) or "-"))
    emit(figures, table, ("pipeline", "student top-1 per seed", "median", "combined teacher top-1"), args.json,
         [f"WRN-16-1 for every model, CIFAR-10 ({args.train_size} training images, full test set), "
          f"{args.epochs} epochs, cosine lr, bf16; seeds {args.seeds}"])


if __name__ == "__main__":
    main()
