"""Pretrained weights of a ``[models.<name>]`` entry (``checkpoint = "RUN_DIR"`` or a file): where
they are (``resolve_checkpoint_file``) and loading them into the built model (``load_pretrained``),
with a ``CheckpointError`` naming the key path when the file is missing or does not fit."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdtoolkit.config.schema import ModelConfig
from kdtoolkit.errors import CheckpointError


def resolve_checkpoint_file(location: str) -> Path:
    """The checkpoint file of ``location``: a run directory (its best, else last checkpoint) or a file."""
    path = Path(location).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.safetensors", path / "best.safetensors", path / "checkpoints" / "last.safetensors"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: run directory without checkpoints/best.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def load_pretrained(model: nn.Module, spec: ModelConfig, name: str) -> None:
    """Load ``spec.checkpoint`` into ``model`` (a quantized model accepts float weights: warm start)."""
    from kdtoolkit.engine.checkpoint import Checkpoint

    try:
        ckpt = Checkpoint(resolve_checkpoint_file(spec.checkpoint))
        source = spec.checkpoint_model or ckpt.meta.get("student") or name
        state = ckpt.model_state(source)
    except CheckpointError as exc:
        raise CheckpointError(f"models.{name}.checkpoint: {exc}") from None
    try:
        if spec.quantizer is not None:
            from kdtoolkit.quant import load_float_state_dict

            try:
                model.load_state_dict(state)
            except RuntimeError:
                load_float_state_dict(model, state)
        else:
            model.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).splitlines()[0]
        raise CheckpointError(f"models.{name}.checkpoint: weights of {source!r} in {ckpt.path} do not fit this model: {message}") from None
