"""Pretrained weights from anywhere, for a model entry's ``checkpoint = ...``.

``checkpoint`` may be

* a kdtoolkit run directory (its ``checkpoints/best.safetensors``) or checkpoint file: the model
  ``checkpoint_model`` of it (default: that run's student);
* a plain safetensors state dict (``safetensors.torch.save_file(model.state_dict(), path)``);
* a PyTorch ``.pt`` / ``.pth`` / ``.bin`` state dict, read with ``torch.load(weights_only=True)``
  only (tensors and plain containers; never arbitrary pickle). A dict holding the state dict under
  ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` is accepted too;
* ``"torchvision:IMAGENET1K_V1"`` (any weight enum name of the model's ``arch``, or ``DEFAULT``)
  for a ``torchvision`` model: downloaded by torchvision into torch hub's cache
  (``$TORCH_HOME/hub/checkpoints``) on first use, then read from there with ``weights_only=True``.
  With another class count than the weights' the classifier keeps its fresh initialisation.

Keys are matched after stripping the wrappers' prefixes ``module.`` (DataParallel / DDP) and
``_orig_mod.`` (``torch.compile``). A quantized model accepts a float state dict (its quantizer
state is initialised from the weights). Anything that does not fit is one ``CheckpointError``
naming the file, the missing and the unexpected keys, and shape mismatches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdtoolkit.errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
TORCHVISION = "torchvision:"


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every leading ``module.`` / ``_orig_mod.`` removed from each key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _run_checkpoint(path: Path) -> Path:
    for candidate in (path / "checkpoints" / "best.safetensors", path / "best.safetensors", path / "checkpoints" / "last.safetensors"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: run directory without checkpoints/best.safetensors")


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors, got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: {', '.join(map(str, bad[:5]))} are not tensors")
    return dict(obj)


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.pth`` state dict through ``torch.load(weights_only=True)``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle refused by weights_only, truncated file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a state dict with torch.load(weights_only=True): {first}") from None
    return _tensor_dict(obj, path)


def read_safetensors(path: Path, checkpoint_model: str | None, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """A kdtoolkit checkpoint's model, or a plain safetensors state dict; ``(state, source)``."""
    from safetensors import SafetensorError, safe_open

    from kdtoolkit.engine.checkpoint import Checkpoint

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if "kdtoolkit" not in header:
                return {k: f.get_tensor(k) for k in f.keys()}, str(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    ckpt = Checkpoint(path)
    source = checkpoint_model or ckpt.meta.get("student") or name
    return ckpt.model_state(source), f"{source!r} in {path}"


def torchvision_state_dict(arch: str, weights_name: str, where: str) -> dict[str, torch.Tensor]:
    """torchvision's weights ``weights_name`` of ``arch`` (from torch hub's cache; downloaded once)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise CheckpointError(f"{where}: torchvision has no pretrained weights for {arch!r}") from None
    names = ["DEFAULT"] + [w.name for w in enum]
    if weights_name not in names:
        raise CheckpointError(f"{where}: unknown weights {weights_name!r} for {arch}; available: {', '.join(names)}")
    weights = enum[weights_name]
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - no network, refused pickle, ...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise CheckpointError(f"{where}: cannot load torchvision weights {arch}.{weights.name} ({exc}); "
                              f"without internet place the file at {cache}") from None
    return _tensor_dict(state, Path(weights.url))


def read_state_dict(location: str, *, spec: Any = None, name: str = "model", where: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict at ``location`` (any format in the module docstring) and a description of
    its source. ``spec`` (the model's ``ModelConfig``) gives ``checkpoint_model`` and the
    torchvision ``arch``."""
    where = where or f"models.{name}.checkpoint"
    if location.startswith(TORCHVISION):
        arch = getattr(getattr(spec, "options", None), "arch", None)
        if getattr(spec, "name", None) != "torchvision" or arch is None:
            raise CheckpointError(f"{where}: {location!r} needs a torchvision model (name = \"torchvision\", arch = ...)")
        weights = location[len(TORCHVISION):]
        return torchvision_state_dict(arch, weights, where), f"torchvision {arch}.{weights}"
    path = Path(location).expanduser()
    checkpoint_model = getattr(spec, "checkpoint_model", None)
    if path.is_dir():
        path = _run_checkpoint(path)
    elif not path.is_file():
        raise CheckpointError(f"{where}: {path}: no such checkpoint file or run directory")
    if path.suffix == ".safetensors":
        state, source = read_safetensors(path, checkpoint_model, name)
    elif path.suffix in (".pt", ".pth", ".bin"):
        if checkpoint_model:
            raise CheckpointError(f"models.{name}.checkpoint_model: only meaningful for a kdtoolkit checkpoint, not {path}")
        state, source = read_torch_file(path), str(path)
    else:
        raise CheckpointError(f"{where}: {path}: unknown weights format (expected a run directory, .safetensors, .pt or .pth)")
    return strip_prefixes(state), source


def fit_report(model: nn.Module, state: Mapping[str, torch.Tensor], *, ignore: set[str] = frozenset()) -> str | None:
    """None if ``state`` fits ``model`` (keys and shapes, ``ignore`` keys may be absent), else a
    message listing the missing and unexpected keys and the shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(ignore))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in set(state) & set(expected)
                    if tuple(state[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or shapes):
        return None

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")

    parts = [f"{label}: {show(keys)}" for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                          ("shape mismatches (file vs model)", shapes)) if keys]
    return "; ".join(parts)


def _fresh_head(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageNet weights for a model with another class count: the classifier (the last Linear, or
    1x1 Conv for SqueezeNet) keeps its fresh initialisation when its shape differs."""
    heads = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not heads:
        return state
    prefix = f"{heads[-1]}."
    expected = model.state_dict()
    return {k: v for k, v in state.items()
            if not (k.startswith(prefix) and k in expected and tuple(expected[k].shape) != tuple(v.shape))} | \
        {k: expected[k] for k in expected if k.startswith(prefix) and k in state and tuple(expected[k].shape) != tuple(state[k].shape)}


def load_pretrained_weights(model: nn.Module, spec: Any, name: str) -> str:
    """Load ``spec.checkpoint`` into ``model`` (built from ``spec``); returns the source described.
    Raises ``CheckpointError`` naming ``models.<name>.checkpoint`` when it does not fit."""
    where = f"models.{name}.checkpoint"
    state, source = read_state_dict(spec.checkpoint, spec=spec, name=name, where=where)
    if spec.checkpoint.startswith(TORCHVISION):
        state = _fresh_head(model, state)
    ignore: set[str] = set()
    if getattr(spec, "quantizer", None) is not None:
        from kdtoolkit.quant.model import quantizer_state_keys

        ignore = set(quantizer_state_keys(model))
    problem = fit_report(model, state, ignore=ignore)
    if problem:
        raise CheckpointError(f"{where}: weights of {source} do not fit this model: {problem}")
    if ignore and not ignore & set(state):
        from kdtoolkit.quant import load_float_state_dict

        load_float_state_dict(model, state)  # float weights: quantizer state from the weights
    else:
        model.load_state_dict(state, strict=not ignore)
    return source
