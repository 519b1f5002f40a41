"""Data: dataset splits as returned by dataset plugins, and the loaders the engine builds from them."""

from __future__ import annotations

from kdtoolkit.data.types import DatasetSplits, TensorSplit

__all__ = ["DatasetSplits", "TensorSplit"]
