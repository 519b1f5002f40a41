"""Batched augmentation on image tensors: random crop with padding, horizontal flip, normalisation.

Whole batches at once, no PIL and no per-image Python loop (as in airbench, Keller Jordan's CIFAR-10
speedruns). The random draws come from an explicit ``torch.Generator`` on the CPU, so a batch's
augmentation is a pure function of the generator's seed and is the same on every device.

Each random transform is split in two: ``crop_offsets``/``flip_mask`` draw the randomness and
``crop``/``flip`` apply it. ``random_crop``/``random_flip`` chain the two; the loader fuses crop and
flip into one gather (``crop(..., flips=mask)``), with the same draws as ``random_flip(random_crop(x,
g), g)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PADDING_MODES", "crop", "crop_offsets", "flip", "flip_mask", "normalize", "normalize_constants",
    "random_crop", "random_flip",
]

#: ``padding_mode`` → ``torch.nn.functional.pad`` mode. "zeros" is torchvision's RandomCrop(fill=0).
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def crop_offsets(n: int, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` random ``(top, left)`` crop corners in the padded image, each uniform in ``[0, 2*padding]``.

    An int64 ``[n, 2]`` CPU tensor; ``(padding, padding)`` is the un-shifted crop.
    """
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)


def flip_mask(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` fair coin flips (bool ``[n]`` CPU tensor): which images to mirror."""
    return torch.randint(0, 2, (n,), generator=generator).bool()


def crop(
    images: Tensor, offsets: Tensor, padding: int, *, padding_mode: str = "zeros", flips: Tensor | None = None
) -> Tensor:
    """Pad ``images`` ``[N, C, H, W]`` by ``padding`` and cut an ``H x W`` window at each offset.

    ``offsets`` is ``[N, 2]`` (top, left) as drawn by ``crop_offsets``; ``flips`` (bool ``[N]``)
    mirrors the selected crops horizontally in the same gather. Any dtype (uint8 is cheapest: crop
    before converting to float); the result is a new contiguous tensor of the same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"crop expects [N, C, H, W] images, got shape {tuple(images.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}")
    n, c, h, w = images.shape
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image ({h}x{w})")
    device = images.device
    offsets = offsets.to(device, non_blocking=True)
    if padding:
        padded = F.pad(images, (padding,) * 4, mode=PADDING_MODES[padding_mode])
    else:
        padded = images
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h, device=device)  # [N, H]
    cols = torch.arange(w, device=device).expand(n, w)  # [N, W]
    if flips is not None:
        cols = torch.where(flips.to(device, non_blocking=True)[:, None], (w - 1) - cols, cols)
    cols = cols + offsets[:, 1:]
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    out = torch.gather(padded.reshape(n, c, hp * wp), 2, index.expand(n, c, h * w))
    return out.view(n, c, h, w)


def flip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror (along the width) the images selected by the bool ``mask`` ``[N]``."""
    mask = mask.to(images.device, non_blocking=True)
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def random_crop(
    images: Tensor, padding: int = 4, generator: torch.Generator | None = None, *, padding_mode: str = "zeros"
) -> Tensor:
    """Batched ``torchvision.transforms.RandomCrop(size=(H, W), padding=padding)``: one draw per image."""
    return crop(images, crop_offsets(images.shape[0], padding, generator), padding, padding_mode=padding_mode)


def random_flip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Batched ``RandomHorizontalFlip(p=0.5)``."""
    return flip(images, flip_mask(images.shape[0], generator))


def normalize_constants(
    mean: Sequence[float], std: Sequence[float], *, uint8: bool, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` ``[1, C, 1, 1]`` float32 such that ``x * scale - shift`` normalises ``x``.

    For uint8 input the ``/255`` is folded into ``scale``.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    std_t = torch.as_tensor(std, dtype=torch.float64)
    if mean_t.shape != std_t.shape or mean_t.dim() != 1:
        raise ValueError(f"mean and std must be equal-length sequences, got {tuple(mean)} and {tuple(std)}")
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be > 0, got {tuple(std)}")
    scale = 1.0 / (std_t * 255.0) if uint8 else 1.0 / std_t
    shift = mean_t / std_t
    return (
        scale.to(torch.float32).view(1, -1, 1, 1).to(device),
        shift.to(torch.float32).view(1, -1, 1, 1).to(device),
    )


def normalize(
    images: Tensor, mean: Sequence[float], std: Sequence[float], *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(x - mean) / std`` per channel, ``x`` on the 0-1 scale (uint8 images are divided by 255).

    Returns a new tensor of ``dtype`` (computed in float32), keeping the input's memory format.
    """
    uint8 = not images.is_floating_point()
    scale, shift = normalize_constants(mean, std, uint8=uint8, device=images.device)
    if images.shape[1] != scale.shape[1]:
        raise ValueError(f"images have {images.shape[1]} channels but mean/std have {scale.shape[1]}")
    out = images.to(torch.float32).mul_(scale).sub_(shift) if uint8 or images.dtype != torch.float32 else images * scale - shift
    return out if dtype == torch.float32 else out.to(dtype)
