"""Read dataset pickles (CIFAR's batch files) without executing code.

``pickle.load`` runs whatever callable the file names, so a planted file in a data directory (or a
relative data root inside a received run directory) would run code on ``kdtoolkit run``/``eval``.
``load`` admits only what CIFAR's files hold: numpy arrays and dtypes (rebuilt by numpy's own
reconstructor) inside plain dicts, lists, strings, bytes and numbers. Any other global is refused
with a ``DataError`` naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.errors import DataError

try:
    from numpy._core import multiarray as _multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

#: (module, name) a dataset pickle may name -> the object used for it
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refused to load: the file names {module}.{name}, which a dataset file "
                "never needs (it could run code); replace the file with the original dataset"
            ) from None

    def persistent_load(self, pid):  # noqa: ARG002 - never part of a dataset file
        raise DataError(f"{self.path}: refused to load: persistent references in a dataset file")


def load(path: str | Path) -> Any:
    """The object pickled in ``path``, built only from numpy arrays and Python builtins."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise DataError(f"{path}: not a readable dataset file ({type(exc).__name__}: {exc})") from None
