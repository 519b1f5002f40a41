"""One activation fake-quantizer, forward and backward, with the fused native kernels against the
ATen implementation, side by side in one process.

    python -m benchmarks.quantizer_ops [--json] [--iters N] [--rounds N]

A W2A2-style 2-bit activation quantizer (LSQ with a learned step, HWGQ) on channels-last tensors of
WRN-16-1's first and last group at batch 128 (128x16x32x32 and 128x64x8x8), float32 and bfloat16.
Four different inputs are cycled so that a pass does not find its data in cache. The two
implementations alternate in rounds; each figure is the best round's mean time per call (µs).
"""

from __future__ import annotations

import contextlib
import time

import torch

from benchmarks._common import add_host_memory_option, apply_host_memory, emit, parser
from kdtoolkit.quant import native
from kdtoolkit_plugins.quantizers.hwgq import HWGQActQuantizer
from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer

SHAPES = ((128, 16, 32, 32), (128, 64, 8, 8))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_quantizer(name: str):
    if name == "hwgq":
        return HWGQActQuantizer(2)
    q = LSQActQuantizer(2)
    q.initialize(torch.ones(1))
    return q


def measure(name: str, dtype: torch.dtype, shape, iters: int, rounds: int) -> dict[str, tuple[float, float]]:
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.rand(shape, generator=gen) * 3).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
          for _ in range(4)]
    dys = [torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    q = make_quantizer(name)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for impl in ("native", "aten"):
            ctx = native.disabled if impl == "aten" else contextlib.nullcontext
            fwd = bwd = 0.0
            with ctx():
                for i in range(iters + 1):
                    x, dy = xs[i % 4], dys[i % 4]
                    t0 = time.perf_counter()
                    y = q(x)
                    t1 = time.perf_counter()
                    y.backward(dy)
                    t2 = time.perf_counter()
                    x.grad = None
                    if i:  # the first call is a warm-up
                        fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
            f, b = 1e6 * fwd / iters, 1e6 * bwd / iters
            if impl not in best or f + b < sum(best[impl]):
                best[impl] = (f, b)
    return best


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20, help="calls per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (best taken)")
    add_host_memory_option(p)
    args = p.parse_args(argv)
    apply_host_memory(args)
    kernels = native.prepare()  # build now (status() alone does not)
    if not kernels["available"]:
        raise SystemExit(f"native kernels unavailable: {kernels['reason']}")
    figures: dict = {"threads": torch.get_num_threads()}
    table = []
    for name in ("lsq", "hwgq"):
        for dname, dtype in DTYPES.items():
            for shape in SHAPES:
                r = measure(name, dtype, shape, args.iters, args.rounds)
                key = f"{name}/{dname}/{'x'.join(map(str, shape))}"
                for impl, (f, b) in r.items():
                    figures[f"{key}/{impl}/forward_us"] = round(f, 1)
                    figures[f"{key}/{impl}/backward_us"] = round(b, 1)
                speedup = sum(r["aten"]) / sum(r["native"])
                figures[f"{key}/speedup"] = round(speedup, 2)
                table.append((name, dname, "x".join(map(str, shape)), f"{r['native'][0]:.0f} / {r['native'][1]:.0f}",
                              f"{r['aten'][0]:.0f} / {r['aten'][1]:.0f}", f"{speedup:.2f}"))
    emit(figures, table, ("quantizer", "dtype", "shape", "native fwd / bwd µs", "ATen fwd / bwd µs", "ATen/native"),
         args.json, [f"{torch.get_num_threads()} threads, channels_last, 2 bits; best of {args.rounds} alternating "
                     f"rounds of {args.iters} calls"])


if __name__ == "__main__":
    main()
