"""Training-data throughput: the in-memory path against torchvision's CIFAR10 + DataLoader.

    python -m benchmarks.data_throughput [--json] [--root DIR] [--batches N]

Both sides produce the same thing, batches of 128 CIFAR-10 training images randomly cropped
(padding 4), flipped and normalised: the in-memory loader on uint8 tensors, torchvision with PIL
transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in 0 and 2 worker
processes. Each figure is the median of several timed runs of ``--batches`` batches after a warm-up
(so worker start-up is not counted). Default data: the CIFAR-10 exact subset in the shared data
folder next to the repository, else ``$KDTOOLKIT_DATA``.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import sys
import time

import torch

from benchmarks._common import default_cifar10_root, emit, median, parser
from kdtoolkit.data.loader import InMemoryLoader
from kdtoolkit.data.sampler import EpochSampler


def endless(loader):
    """Batches of ``loader`` epoch after epoch (``set_epoch`` when it has one)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def images_per_second(loader, *, batches: int, warmup: int, repeats: int) -> float:
    stream = endless(loader)
    for _ in range(warmup):
        next(stream)
    rates = []
    for _ in range(repeats):
        count = 0
        start = time.perf_counter()
        for _ in range(batches):
            images, _labels = next(stream)
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return median(rates)


def measure(root: pathlib.Path, *, batches: int, batch_size: int, workers: tuple[int, ...]) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from kdtoolkit_plugins.datasets import CifarOptions, build_cifar10
    from kdtoolkit_plugins.datasets.cifar import LocalCIFAR10

    splits = build_cifar10(CifarOptions(), root=root, download=False)
    results: dict[str, float] = {}
    for name, channels_last in (("in_memory", False), ("in_memory_channels_last", True)):
        loader = InMemoryLoader(
            splits.train, batch_size=batch_size, augment=True, mean=splits.mean, std=splits.std, seed=0,
            sampler=EpochSampler(len(splits.train), shuffle=True, seed=0), channels_last=channels_last,
        )
        results[name] = images_per_second(loader, batches=batches, warmup=5, repeats=5)

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(splits.mean, splits.std),
    ])
    dataset = LocalCIFAR10(str(root), train=True, transform=transform)
    for w in workers:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=w, persistent_workers=w > 0,
            generator=torch.Generator().manual_seed(0),
        )
        results[f"torchvision_workers_{w}"] = images_per_second(
            loader, batches=batches, warmup=max(5, 2 * w), repeats=3
        )
        del loader

    baselines = {k: v for k, v in results.items() if k.startswith("torchvision")}
    return {
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "speedup_in_memory_vs": {k: round(results["in_memory"] / v, 1) for k, v in baselines.items()},
        "batch_size": batch_size,
        "batches_timed": batches,
        "train_images": len(splits.train),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "root": str(root),
    }


def report(figures: dict, as_json: bool) -> None:
    rates = figures["images_per_s"]
    fast = rates["in_memory"]
    table = [
        (name, f"{rate:,.0f}", f"{1000 * figures['batch_size'] / rate:.2f}", f"{fast / rate:.1f}")
        for name, rate in rates.items()
    ]
    worst = min(figures["speedup_in_memory_vs"].values())
    notes = [
        f"CIFAR-10 train augmentation, batch {figures['batch_size']}, median of runs of {figures['batches_timed']} "
        f"batches; {figures['train_images']} images from {figures['root']}; {figures['cpus']} CPUs, torch threads "
        f"{figures['torch_threads']}",
        f"in-memory is {worst:.1f}x the fastest torchvision DataLoader "
        f"({'meets' if worst >= 10 else 'misses'} the 10x target)",
    ]
    emit(figures, table, ("pipeline", "images/s", "ms/batch", "in-memory x"), as_json, notes)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", type=pathlib.Path, default=None,
                   help="directory holding cifar-10-batches-py/ (default: the shared exact subset, else $KDTOOLKIT_DATA)")
    p.add_argument("--batches", type=int, default=100, help="batches per timed run (default 100)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (default 0 2)")
    args = p.parse_args(argv)
    root = args.root or default_cifar10_root()
    if root is None or not (pathlib.Path(root) / "cifar-10-batches-py").is_dir():
        print(f"error: no cifar-10-batches-py/ in {root or 'the shared data or $KDTOOLKIT_DATA'}; pass --root",
              file=sys.stderr)
        return 2
    root = pathlib.Path(root).expanduser().resolve()
    figures = measure(root, batches=args.batches, batch_size=args.batch_size, workers=tuple(args.workers))
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
