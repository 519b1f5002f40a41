"""Quantization-aware training cost: training images/s of W2A2 HWGQ and LSQ models against the same
model in float, side by side in one process. Target: QAT/float step-time ratio <= 1.25.

    python -m benchmarks.qat_throughput [--json] [--steps N] [--resnet-steps N] [--rounds N] [--aten] [--compile]

Models: WRN-16-1 and CIFAR ResNet-18 (100 classes) from the model zoo; first conv and last linear
full precision (the default). A step is forward + cross-entropy + backward + SGD (momentum 0.9,
weight decay 5e-4) on a batch of 128 random 32x32 images; ``bf16`` = channels_last + bf16 autocast,
``fp32`` = channels_last in float32. The variants of a (model, precision) pair are timed in
alternating rounds (float, hwgq, lsq, float, hwgq, lsq, ...) after one warm-up step each; the ratio
is the median over rounds of (variant step time / float step time in the same round).
On the CPU the quantizer ops run the fused kernels of ``kdtoolkit.quant.native`` (as in a real run);
``--aten`` adds HWGQ and LSQ with those kernels turned off (their ATen implementation), for
comparison. ``--compile`` adds the same three variants under ``torch.compile`` (compiled QAT against compiled
float; the quantizers stay single custom ops, ``kdtoolkit::lsq_forward`` etc., calling the same
kernels; compiling takes a minute or more per model on 2 cores and is not timed).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from benchmarks._common import add_host_memory_option, apply_host_memory, emit, median, parser
from kdtoolkit.quant import native, quantize_model

VARIANTS = ("float", "hwgq", "lsq")
PRECISIONS = ("bf16", "fp32")


def build_model(name: str) -> torch.nn.Module:
    if name == "wrn16_1":
        from kdtoolkit_plugins.models.wrn import WideResNet

        return WideResNet(16, 1, num_classes=100)
    if name == "resnet18":
        from kdtoolkit_plugins.models.resnet_cifar import CifarResNet

        return CifarResNet(18, num_classes=100)
    raise ValueError(f"unknown model {name!r}")


def make_quantizer(variant: str):
    if variant == "hwgq":
        from kdtoolkit_plugins.quantizers.hwgq import HWGQOptions, HWGQQuantizer

        return HWGQQuantizer(HWGQOptions(weight_bits=2, act_bits=2))
    from kdtoolkit_plugins.quantizers.lsq import LSQOptions, LSQQuantizer

    return LSQQuantizer(LSQOptions(weight_bits=2, act_bits=2))


def make_step(model_name: str, variant: str, precision: str, images, labels):
    torch.manual_seed(0)
    model = build_model(model_name)
    quantizer, _, compiled = variant.partition("+")
    quantizer, _, implementation = quantizer.partition("/")
    if quantizer != "float":
        quantize_model(model, make_quantizer(quantizer), weight_bits=2, act_bits=2)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    kernels = native.disabled if implementation == "aten" else contextlib.nullcontext

    def step():
        with autocast(), kernels():
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        with kernels():
            loss.backward()
        optimizer.step()

    return step


def measure(model_name: str, precision: str, steps: int, rounds: int, variants) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(128, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (128,), generator=gen)
    steppers = {v: make_step(model_name, v, precision, images, labels) for v in variants}
    for step in steppers.values():  # warm-up (allocator, oneDNN primitives, LSQ activation init, compiling)
        step()
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            t = time.perf_counter()
            for _ in range(steps):
                steppers[v]()
            times[v].append((time.perf_counter() - t) / steps)
    out = {}
    for v in variants:
        base = "float+compile" if v.endswith("+compile") else "float"
        ratio = median([a / b for a, b in zip(times[v], times[base])])
        out[v] = {"images_per_s": 128 / median(times[v]), "step_ms": 1e3 * median(times[v]), "ratio": ratio}
    return out


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per round for WRN-16-1")
    p.add_argument("--resnet-steps", type=int, default=2, help="timed steps per round for ResNet-18")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median taken)")
    p.add_argument("--models", default="wrn16_1,resnet18", help="comma list of wrn16_1, resnet18")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of bf16, fp32")
    p.add_argument("--compile", action="store_true", help="also time the three variants under torch.compile")
    p.add_argument("--aten", action="store_true",
                   help="also time HWGQ and LSQ with the fused native kernels turned off (their ATen path)")
    add_host_memory_option(p)
    args = p.parse_args(argv)
    apply_host_memory(args)
    variants = VARIANTS + (("hwgq/aten", "lsq/aten") if args.aten else ())
    variants += tuple(f"{v}+compile" for v in VARIANTS) if args.compile else ()
    kernels = native.prepare()  # build now (status() alone does not)
    figures: dict = {"threads": torch.get_num_threads(), "rounds": args.rounds, "native_kernels": kernels["available"]}
    table = []
    for model_name in args.models.split(","):
        steps = args.steps if model_name == "wrn16_1" else args.resnet_steps
        for precision in args.precisions.split(","):
            result = measure(model_name, precision, steps, args.rounds, variants)
            for v in variants:
                r = result[v]
                key = f"{model_name}/{precision}/{v}"
                figures[f"{key}/images_per_s"] = round(r["images_per_s"], 1)
                figures[f"{key}/ratio"] = round(r["ratio"], 3)
                name = v if v.startswith("float") else v.replace("+", " W2A2 +", 1) if "+" in v else f"{v} W2A2"
                name = name.replace("/aten W2A2", " W2A2 (ATen)")
                table.append((model_name, precision, name,
                              f"{r['images_per_s']:.0f}", f"{r['step_ms']:.0f}", f"{r['ratio']:.3f}"))
    emit(figures, table, ("model", "precision", "variant", "img/s", "ms/step", "time ratio vs float"), args.json,
         [f"batch 128, {torch.get_num_threads()} threads, channels_last; median of {args.rounds} alternating rounds; "
          "target QAT/float <= 1.25 (compiled variants against compiled float)",
          f"native quantizer kernels: {'on' if kernels['available'] else 'unavailable: ' + kernels['reason']}"])


if __name__ == "__main__":
    main()
