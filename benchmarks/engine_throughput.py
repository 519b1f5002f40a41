"""Engine overhead: the ``supervised`` training step of the engine against a minimal hand-written
PyTorch loop, same model (WRN-16-1), data, loader, optimizer and precision, timed in alternating
rounds in one process. Target: engine >= 0.97x the hand loop's images/s.

    python -m benchmarks.engine_throughput [--steps 30] [--rounds 5] [--json]
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from benchmarks._common import default_cifar10_root, emit, median, parser
from kdtoolkit import Pipeline
from kdtoolkit.engine.distributed import DistInfo
from kdtoolkit.engine.trainer import Trainer


def pipeline_dict(root, precision: str, channels_last: bool, steps: int) -> dict:
    data = {"name": "cifar10", "batch_size": 128}
    if root:
        data["root"] = root
    return {
        "run": {"name": "bench", "epochs": 1000, "precision": precision, "channels_last": channels_last,
                "progress": "off", "max_steps_per_epoch": steps, "output_dir": "/tmp/kdtoolkit-bench-unused"},
        "data": data,
        "models": {"student": {"name": "wrn", "depth": 16, "width": 1}},
        "losses": [{"name": "ce"}],
        "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": {"name": "cosine"}},
    }


def hand_loop(model, optimizer, loader, steps: int, precision: str) -> int:
    """The loop everyone writes (torchvision's reference, minus logging)."""
    model.train()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    n = 0
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        with ctx:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += labels.shape[0]
    return n


def measure(root, precision, channels_last, steps, rounds):
    pipe = Pipeline.from_dict(pipeline_dict(root, precision, channels_last, steps))
    built = pipe.build()
    _, loader, test_loader = built.data
    trainer = Trainer(built, loader, test_loader, pipe.run_dir, dist=DistInfo(), raw_config=pipe.raw)
    # the hand loop's own model and optimizer, identical settings
    torch.manual_seed(0)
    model = pipe.registry.get("model", "wrn").factory(pipe.config.models["student"].options, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    engine, hand = [], []
    # warm-up of both
    trainer.train_epoch(0, 0)
    hand_loop(model, optimizer, loader, steps, precision)
    def time_engine(epoch):
        t = time.perf_counter()
        row = trainer.train_epoch(epoch, 0)  # sets the loader's epoch itself
        engine.append(row["step"] * loader.batch_size / (time.perf_counter() - t))

    def time_hand(epoch):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        n = hand_loop(model, optimizer, loader, steps, precision)
        hand.append(n / (time.perf_counter() - t))

    for r in range(rounds):  # alternate which goes first, so neither gains from the order
        first, second = (time_engine, time_hand) if r % 2 == 0 else (time_hand, time_engine)
        first(r + 1)
        second(r + 1)
    # the ratio of each adjacent pair cancels the machine's slow drifts; report its median
    ratio = median([e / h for e, h in zip(engine, hand)])
    return median(engine), median(hand), ratio


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--configs", default="fp32,bf16+cl", help="comma list of fp32, bf16, fp32+cl, bf16+cl")
    args = p.parse_args(argv)
    root = default_cifar10_root()
    figures, table = {"threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds}, []
    for cfg in args.configs.split(","):
        precision, _, cl = cfg.partition("+")
        e, h, ratio = measure(root, precision, cl == "cl", args.steps, args.rounds)
        figures[f"{cfg}/engine_images_per_s"] = round(e, 1)
        figures[f"{cfg}/hand_loop_images_per_s"] = round(h, 1)
        figures[f"{cfg}/ratio"] = round(ratio, 3)
        table.append((f"WRN-16-1 {cfg}", f"{e:.0f}", f"{h:.0f}", f"{ratio:.3f}"))
    emit(figures, table, ("config", "engine img/s", "hand loop img/s", "engine/hand"), args.json,
         [f"{args.rounds} alternating rounds of {args.steps} steps, batch 128, {torch.get_num_threads()} threads: "
          "median images/s, and the median of the per-round ratios; target ratio >= 0.97"])


if __name__ == "__main__":
    main()
