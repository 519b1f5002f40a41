"""The ONNX student in onnxruntime on the CPU: latency and file size against the float ONNX model.

    python -m benchmarks.onnx_latency [--json] [--arch wrn|resnet18_cifar] [--depth 16] [--width 1]
                                      [--batch 1] [--batch 64] [--rounds 7] [--threads N]

What a deployment user looks at first. The student (WRN-16-1 by default; weights, BN statistics and
LSQ steps from a few training-mode batches, no training: latency and size do not depend on the
values) is quantized W2A2 and W4A4 with HWGQ and LSQ, exported with ``kdtoolkit.onnx_export``
alongside the same architecture in float, and each ONNX file runs in an onnxruntime
``InferenceSession`` with the default session options (what a user gets). The models alternate in
rounds; each figure is the best round's median latency per batch (ms). Sizes are the .onnx files.

Expect the quantized models to be *slower* than the float one on the CPU: onnxruntime has no
INT2/INT4 convolution kernels, so the QDQ graph dequantizes the weights and runs float
convolutions, plus the activation Quantize/Dequantize passes. The gain is the file size (and the
exact low-bit model, ready for an accelerator's QDQ compiler).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import emit, parser


def build(arch: str, depth: int, width: int, quantizer: str | None, bits: int):
    from kdtoolkit.config.load import make_converter
    from kdtoolkit.plugins import load_registry
    from kdtoolkit.quant import quantize_model

    registry = load_registry()
    conv = make_converter(registry)
    options = {"depth": depth, "width": width} if arch == "wrn" else {}
    component = registry.get("model", arch)
    torch.manual_seed(0)
    model = component.factory(conv.structure(options, component.options), num_classes=10)
    if quantizer:
        q = registry.get("quantizer", quantizer)
        quantize_model(model, q.factory(conv.structure({"weight_bits": bits, "act_bits": bits}, q.options)))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("wrn", "resnet18_cifar"), default="wrn")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 64)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20, help="runs per round")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = p.parse_args()
    import onnxruntime as ort

    from kdtoolkit.onnx_export import export_onnx

    batches = args.batch or [1, 64]
    variants = [("float", None, 32), ("hwgq W2A2", "hwgq", 2), ("lsq W2A2", "lsq", 2), ("hwgq W4A4", "hwgq", 4), ("lsq W4A4", "lsq", 4)]
    sessions, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, quantizer, bits in variants:
            path = Path(tmp) / f"{label.replace(' ', '_')}.onnx"
            sizes[label] = export_onnx(build(args.arch, args.depth, args.width, quantizer, bits), path)["file"]
            options = ort.SessionOptions()
            if args.threads:
                options.intra_op_num_threads = args.threads
            sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, 32, 32)).astype(np.float32) for b in batches}
    best: dict[tuple[str, int], float] = {}
    for label, session in sessions.items():  # warm-up
        for b in batches:
            session.run(None, {"input": inputs[b]})
    for _ in range(args.rounds):
        for b in batches:
            for label, session in sessions.items():
                times = []
                for _ in range(args.iters):
                    start = time.perf_counter()
                    session.run(None, {"input": inputs[b]})
                    times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                best[(label, b)] = min(best.get((label, b), float("inf")), ms)
    name = f"WRN-{args.depth}-{args.width}" if args.arch == "wrn" else "ResNet-18 (CIFAR)"
    table, figures = [], {"model": name, "onnxruntime": ort.__version__, "sizes": sizes, "latency_ms": {}}
    for label in sessions:
        row = [label, f"{sizes[label] / 1024:.1f}", f"{sizes['float'] / sizes[label]:.1f}x"]
        for b in batches:
            row += [f"{best[(label, b)]:.3f}", f"{best[(label, b)] / best[('float', b)]:.2f}"]
            figures["latency_ms"][f"{label}/batch{b}"] = best[(label, b)]
        table.append(tuple(row))
    headers = ("model", "ONNX KiB", "smaller") + tuple(h for b in batches for h in (f"ms/batch {b}", "vs float"))
    emit(figures, table, headers, args.json, notes=[
        f"{name}, onnxruntime {ort.__version__} CPU, default session options, best of {args.rounds} rounds of "
        f"{args.iters} runs (median); the machine is shared, so absolute times are noisy, ratios less so."])


if __name__ == "__main__":
    main()
