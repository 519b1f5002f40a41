"""Wide residual networks for CIFAR (WRN-d-k).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): pre-activation basic
blocks (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), three groups of
``(d - 4) / 6`` blocks of widths ``16k, 32k, 64k``. The same network serves as teacher and student in
attention transfer (Zagoruyko & Komodakis, ICLR 2017) and in CTKD.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "WideResNet"]


class BasicBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` plus the shortcut.

    When the width or the stride changes, the shortcut is a 1x1 conv applied to the *pre-activated*
    input (``relu1(bn1(x))``), as in the WRN reference code; otherwise it is the identity on ``x``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """CIFAR WRN-``depth``-``width``: ``conv1 → block1 → block2 → block3 → bn → relu → pool → fc``.

    ``depth`` must be ``6n + 4`` (``n`` blocks per group). Parameters for 10 classes: WRN-16-1 175,066
    (0.175M), WRN-40-1 563,930 (0.57M with 100 classes). Stages (``StagedModel``) end at ``block1``,
    ``block2``, ``block3`` (32x32, 16x16 and 8x8 maps on CIFAR: the attention-transfer points); the
    head is ``bn → relu → global average pool → fc``.

    Initialisation as in the reference code: Kaiming-normal convs (fan-out, ReLU gain), BN weight 1 /
    bias 0, linear bias 0 (linear weight left at PyTorch's default).
    """

    stage_paths = ("block1", "block2", "block3")

    def __init__(self, depth: int = 16, width: int = 1, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, stride=1, dropout=dropout)
        self.block2 = self._group(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.block3 = self._group(widths[2], widths[3], n, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *(BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout) for i in range(n))
        )

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Stage ``k`` of ``StagedModel``: 0 = conv1+block1, 1 = block2, 2 = block3, 3 = the head."""
        if k == 0:
            return self.block1(self.conv1(x))
        if k == 1:
            return self.block2(x)
        if k == 2:
            return self.block3(x)
        if k == 3:
            return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(x))), 1))
        raise IndexError(f"WideResNet has stages 0..3 (3 = head), got {k}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(x))), 1))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.width}"
