"""The start-up banner of a run: what is trained, on what data, where, and where the run directory is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

import kdtoolkit


def _parameter_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _bits(quantizer) -> str:
    if quantizer is None:
        return "float"
    options = quantizer.options
    w, a = getattr(options, "weight_bits", None), getattr(options, "act_bits", None)
    bits = "".join(f"{p}{b}" for p, b in (("W", w), ("A", a)) if b is not None) or "quantized"
    edges = ", first/last layers float" if quantizer.keep_first_last else ""
    return f"{bits} {quantizer.name}{edges}"


def _options(options: Any, *, changed_only: bool = False) -> str:
    """``key=value`` of the options (``changed_only``: those that differ from their defaults)."""
    if options is None or not attrs.has(type(options)):
        return ""
    fields = attrs.fields(type(options))
    shown = []
    for field in fields:
        value = getattr(options, field.name)
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        if value is not None and (value != default or not changed_only):
            shown.append(f"{field.name}={value}")
    return ", ".join(shown)


def banner_lines(built, *, run_dir: Path, data_root: Path | None, train_steps: int, resume: bool) -> list[str]:
    """The banner's lines for a built pipeline (``Pipeline.build``)."""
    cfg = built.config
    splits = built.data[0]
    lines = [f"kdtoolkit {kdtoolkit.__version__}: {'resuming' if resume else 'starting'} run {cfg.run.name!r} "
             f"(method {cfg.method.name}, {cfg.run.epochs} epochs x {train_steps} steps, seed {cfg.run.seed})"]
    for name, spec in cfg.models.items():
        model = built.models[name]
        params = sum(p.numel() for p in model.parameters())
        what = [spec.role + (", frozen" if spec.frozen else ""), f"{_parameter_count(params)} parameters", _bits(spec.quantizer)]
        if spec.checkpoint:
            what.append(f"weights from {spec.checkpoint}")
        lines.append(f"  model {name}: {spec.name}({_options(spec.options)}): {'; '.join(what)}")
    terms = ", ".join(f"{lc.label or lc.name} x{lc.weight:g}" for lc in cfg.losses) or "the method's"
    lines.append(f"  losses: {terms} (logged weighted, as added to the total)")
    # the embedded sample (cifar10_sample) is read from the installed package, not from a data root
    where = "shipped with kdtoolkit" if data_root is None or cfg.data.name.endswith("_sample") else f"from {data_root}"
    options = _options(cfg.data.options, changed_only=True)
    lines.append(f"  data: {cfg.data.name}{f' ({options})' if options else ''}: {len(splits.train)} train / "
                 f"{len(splits.test)} test images, {splits.num_classes} classes, batch {cfg.data.batch_size}; {where}")
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n != 1 else ''}" if built.device.type == "cpu" else ""
    schedule = cfg.optimizer.schedule.name if cfg.optimizer.schedule else "constant"
    lines.append(f"  device: {built.device}{threads}; precision {cfg.run.precision}"
                 f"{', channels-last' if cfg.run.channels_last else ''}; {cfg.optimizer.name} lr {cfg.optimizer.lr:g} ({schedule})")
    lines.append(f"  run directory: {run_dir} (log.txt, metrics.{cfg.run.metrics_format}, checkpoints/); "
                 f"kdtoolkit status {run_dir}")
    return lines
