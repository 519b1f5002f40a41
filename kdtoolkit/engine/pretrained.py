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
    """Load ``spec.checkpoint`` into ``model``: every weight format (``kdtoolkit.weights``)."""
    from kdtoolkit.weights import load_pretrained_weights

    load_pretrained_weights(model, spec, name)
