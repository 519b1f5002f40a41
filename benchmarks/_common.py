"""Shared helpers of the benchmarks: argument parsing, data location, table printing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_cifar10_root() -> str | None:
    """The small exact CIFAR-10 subset beside the repo, else $KDTOOLKIT_DATA, else None (synthetic)."""
    for candidate in (REPO.parent / "shared" / "data" / "cifar10-exact-subset", os.environ.get("KDTOOLKIT_DATA")):
        if candidate and (Path(candidate) / "cifar-10-batches-py").is_dir():
            return str(candidate)
    return None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures only")
    return p


def median(xs):
    return statistics.median(xs)


def emit(figures: dict, table: list[tuple], headers: tuple, as_json: bool, notes: list[str] = ()) -> None:
    if as_json:
        print(json.dumps(figures))
        return
    widths = [max(len(str(h)), *(len(str(r[i])) for r in table)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for n in notes:
        print(n)


def add_host_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-memory", choices=("reuse", "system"), default="reuse",
                   help="glibc malloc policy, as [run] host_memory (the engine's default: reuse)")


def apply_host_memory(args) -> None:
    """What the Trainer does for ``host_memory = "reuse"``, for benchmarks that do not build one."""
    if args.host_memory == "reuse":
        from kdtoolkit.engine.memory import reuse_freed_memory

        reuse_freed_memory()
