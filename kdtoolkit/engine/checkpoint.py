"""Checkpoints: one safetensors file each, written atomically.

A checkpoint holds every tensor of the pipeline (the state dict of the models, loss terms and method,
including quantizer state and fusion weights), the optimizer's tensor state and the RNG states as
safetensors tensors, and everything else (epoch, step, config, optimizer hyper-parameters, best
metric) as JSON in the safetensors metadata. No pickle. The file is written to a temporary name,
fsynced and renamed over the old one, so a crash mid-write never corrupts the last good checkpoint;
temporary files a killed write left behind are removed by ``remove_stale_temporaries``.

Verified on load: the metadata lists every tensor with its dtype and SHA-256 digest, so a flipped
bit, a tensor stored in another dtype, or a missing model/optimizer/RNG tensor is a
``CheckpointError`` naming the file; non-finite floating-point tensors are refused too. Checkpoints
written before digests existed (no ``tensors`` entry) load with a warning, unverified.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdtoolkit.errors import CheckpointError

FORMAT = "kdtoolkit-checkpoint"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
MODULE = "module/"
OPTIM = "optim/"
RNG = "rng/"


#: Test hook (kill-point tests): called with the name of each step of a checkpoint/metrics write,
#: e.g. ``"last.safetensors:written"`` (temporary file complete, not yet renamed) or ``":renamed"``.
sequence_hook: Callable[[str], None] | None = None


def sequence_point(name: str) -> None:
    if sequence_hook is not None:
        sequence_hook(name)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so ``json.dumps(allow_nan=False)`` works."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's raw bytes."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared storage and non-contiguous tensors; a copy on the CPU fixes both.
    return t.detach().to("cpu", copy=True).contiguous()


def _optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM}{pid}/{key}"] = _tensor(value)
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name[len(OPTIM):].split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["plain_state"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {f"{RNG}torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{RNG}cuda_{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if f"{RNG}torch_cpu" in tensors:
        torch.set_rng_state(tensors[f"{RNG}torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith(f"{RNG}cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file next to ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sequence_point(f"{path.name}:written")
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:  # e.g. a full disk
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    sequence_point(f"{path.name}:renamed")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of writes that were killed before their rename (``atomic_write``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    path: Path,
    module: torch.nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict[str, Any],
    include_rng: bool = True,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {MODULE + k: _tensor(v) for k, v in module.state_dict().items()}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
        info["optimizer"] = opt_meta
    if include_rng:
        tensors.update(rng_state())
    for k, v in (extra_tensors or {}).items():
        tensors[k] = _tensor(v)
    info["tensors"] = {k: {"dtype": _dtype_name(v), "sha256": digest(v)} for k, v in tensors.items()}
    header = {"kdtoolkit": json.dumps(json_safe(info), allow_nan=False)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load ``state`` into ``module`` only if it matches: every tensor present, none extra, same
    dtypes and shapes (``weights.fit_report``); otherwise ``CheckpointError`` naming ``path``."""
    from kdtoolkit.weights import fit_report

    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].dtype != value.dtype:
            raise CheckpointError(f"{path}: tensor {key} is {value.dtype}, this pipeline has {own[key].dtype}")
    problem = fit_report(module, state)
    if problem:
        raise CheckpointError(f"{path}: does not match this pipeline ({problem})")
    module.load_state_dict(state)


class Checkpoint:
    """A checkpoint read back: ``meta`` (JSON), ``module_state`` and the rest, all on the CPU."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such checkpoint")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"{self.path}: not a readable safetensors checkpoint ({exc})") from None
        if "kdtoolkit" not in header:
            raise CheckpointError(f"{self.path}: safetensors file without kdtoolkit metadata")
        try:
            self.meta = json.loads(header["kdtoolkit"])
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: damaged checkpoint metadata ({exc})") from None
        if not isinstance(self.meta, dict):
            raise CheckpointError(f"{self.path}: damaged checkpoint metadata (not a JSON object)")
        if self.meta.get("format") != FORMAT or not isinstance(self.meta.get("format_version", 0), int) or self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: unsupported checkpoint format {self.meta.get('format')!r} v{self.meta.get('format_version')}")
        self._verify()

    def _verify(self) -> None:
        """Digests, dtypes and completeness against the metadata; finite floating-point values."""
        listed = self.meta.get("tensors")
        if listed is None:
            print(f"warning: {self.path}: written without tensor digests (an older kdtoolkit); loaded unverified", file=sys.stderr)
        elif not isinstance(listed, dict):
            raise CheckpointError(f"{self.path}: damaged checkpoint metadata (tensors)")
        else:
            missing = sorted(set(listed) - set(self.tensors))
            if missing:
                raise CheckpointError(f"{self.path}: incomplete checkpoint: missing tensor(s) {', '.join(missing[:5])}")
            extra = sorted(set(self.tensors) - set(listed))
            if extra:
                raise CheckpointError(f"{self.path}: damaged checkpoint: tensor(s) not in its metadata: {', '.join(extra[:5])}")
            for name, entry in listed.items():
                t = self.tensors[name]
                if not isinstance(entry, dict) or entry.get("dtype") != _dtype_name(t):
                    want = entry.get("dtype") if isinstance(entry, dict) else "?"
                    raise CheckpointError(f"{self.path}: damaged checkpoint: tensor {name} is {_dtype_name(t)}, written as {want}")
                if entry.get("sha256") != digest(t):
                    raise CheckpointError(f"{self.path}: damaged checkpoint: tensor {name} does not match its digest")
        for name, t in self.tensors.items():
            if not name.startswith(RNG) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{self.path}: tensor {name} holds non-finite values (NaN or inf)")
        if "optimizer" in self.meta and not isinstance(self.meta["optimizer"], dict):
            raise CheckpointError(f"{self.path}: damaged checkpoint metadata (optimizer)")

    def require(self, *keys: str) -> None:
        """``CheckpointError`` naming the file unless the metadata has every one of ``keys``."""
        missing = [k for k in keys if k not in self.meta]
        if missing:
            raise CheckpointError(f"{self.path}: checkpoint metadata lacks {', '.join(missing)}")

    @property
    def module_state(self) -> dict[str, torch.Tensor]:
        return {k[len(MODULE):]: v for k, v in self.tensors.items() if k.startswith(MODULE)}

    def model_state(self, model_name: str) -> dict[str, torch.Tensor]:
        prefix = f"models.{model_name}."
        state = {k[len(prefix):]: v for k, v in self.module_state.items() if k.startswith(prefix)}
        if not state:
            names = sorted({k.split(".")[1] for k in self.module_state if k.startswith("models.")})
            raise CheckpointError(f"{self.path}: no model {model_name!r} in this checkpoint; it has {', '.join(names)}")
        return state

    def optimizer_state(self) -> dict | None:
        if "optimizer" not in self.meta:
            return None
        return _optimizer_from_tensors({k: v for k, v in self.tensors.items() if k.startswith(OPTIM)}, self.meta["optimizer"])

    def restore_rng(self) -> None:
        set_rng_state({k: v for k, v in self.tensors.items() if k.startswith(RNG)})
