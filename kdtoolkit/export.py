"""Export a run's model: packed low-bit integer codes (kdtoolkit's format, loaded back by
``load_model``) or ONNX (:mod:`kdtoolkit.onnx_export`).

``export_run`` reads a run directory (its pipeline and checkpoint), rebuilds the model through its
model plugin and writes it with ``kdtoolkit.quant.export_quantized``; the file records the model
plugin, its options and the class count, so ``load_model`` rebuilds the module from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdtoolkit.errors import CheckpointError, ConfigError


def float32_bytes(model: nn.Module) -> int:
    """Size of the model's state (parameters and buffers) stored as float32."""
    return sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())


def load_run_model(run_dir: str | Path, *, model_name: str | None = None, checkpoint: str = "best"):
    """``(model, spec, name, num_classes, checkpoint)`` of a run's model with its checkpoint's
    weights, in eval mode (quantized models fake-quantized as trained)."""
    from kdtoolkit.engine.assemble import build_model
    from kdtoolkit.engine.checkpoint import Checkpoint, load_matching
    from kdtoolkit.pipeline import Pipeline

    pipe = Pipeline.from_run_dir(run_dir)
    ckpt = Checkpoint(Path(run_dir) / "checkpoints" / f"{checkpoint}.safetensors")
    name = model_name or ckpt.meta.get("student")
    if name not in pipe.config.models:
        raise ConfigError(f"--model: no model {name!r} in this run; models: {', '.join(pipe.config.models)}")
    num_classes = ckpt.meta.get("num_classes")
    if num_classes is None:
        raise CheckpointError(f"{ckpt.path}: the checkpoint does not record num_classes (written by an older kdtoolkit)")
    model = build_model(pipe.config, pipe.registry, name, num_classes)
    load_matching(model, ckpt.model_state(name), ckpt.path)
    model.eval()
    return model, pipe, name, num_classes, ckpt


def export_run(run_dir: str | Path, out: str | Path, *, model_name: str | None = None, checkpoint: str = "best",
               format: str = "packed") -> dict[str, Any]:
    """Write a run's model as ``format``: ``"packed"`` (kdtoolkit's safetensors of packed codes,
    quantized models only) or ``"onnx"`` (quantized or float; see :mod:`kdtoolkit.onnx_export`)."""
    from kdtoolkit.config.load import make_converter

    if format not in ("packed", "onnx"):
        raise ConfigError(f"--format: expected packed or onnx, got {format!r}")
    model, pipe, name, num_classes, ckpt = load_run_model(run_dir, model_name=model_name, checkpoint=checkpoint)
    spec = pipe.config.models[name]
    conv = make_converter(pipe.registry)
    architecture = {
        "model": spec.name,
        "options": conv.unstructure(spec.options) if spec.options is not None else {},
        "num_classes": num_classes,
        "source": {"run_dir": str(run_dir), "model": name, "checkpoint": checkpoint, "epoch": ckpt.meta.get("epoch")},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        import json

        from kdtoolkit.onnx_export import export_onnx

        sizes = export_onnx(model, out, metadata={"kdtoolkit.architecture": json.dumps(architecture, sort_keys=True)})
        sizes["float32_model"] = float32_bytes(model)
        return sizes
    if spec.quantizer is None:
        raise ConfigError(f"model {name!r} of {run_dir} is not quantized (no quantizer in its pipeline): nothing to pack; "
                          "use --format onnx for a float model")
    from kdtoolkit.quant.export import export_quantized

    sizes = export_quantized(model, out, architecture)
    sizes["float32_model"] = float32_bytes(model)
    return sizes


def load_model(path: str | Path, *, registry=None) -> nn.Module:
    """Rebuild the module of an exported file (eval mode); its logits equal the trained
    fake-quantized model's."""
    from kdtoolkit.config.load import make_converter
    from kdtoolkit.plugins import load_registry
    from kdtoolkit.quant.export import load_exported

    registry = registry or load_registry()

    def build(meta: dict[str, Any]) -> nn.Module:
        component = registry.get("model", meta["model"])
        options = make_converter(registry).structure(meta["options"], component.options) if component.options else None
        return component.factory(options, num_classes=meta["num_classes"])

    return load_exported(path, build, registry=registry)
