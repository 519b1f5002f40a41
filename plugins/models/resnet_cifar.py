"""ResNet-18/34 for 32x32 inputs.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, with the usual CIFAR
stem (a 3x3 stride-1 conv, no max-pool) so the four stages see 32, 16, 8 and 4 pixel maps. This is the
ResNet-18 of CMT-KD (Pham et al., WACV 2023) on CIFAR-100. Parameter and module names follow
torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``), so state
dicts map one-to-one apart from the stem and the head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "LAYERS"]

#: blocks per stage for each supported depth (all BasicBlock).
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Post-activation basic block ``conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU``.

    Unlike torchvision's block, each ReLU is its own module (``relu1``, ``relu2``) so that an
    activation quantizer can be placed at each one; there are no parameters in a ReLU, so the state
    dict keys are torchvision's.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-``depth`` (18 or 34) for CIFAR: ``conv1(3x3) → bn1 → relu → layer1..4 → pool → fc``.

    ResNet-18 has 11,173,962 parameters for 10 classes (11.22M for 100). Stages end at ``layer1`` to
    ``layer4`` (the last conv of each stage: CMT-KD's fusion points); the head is pool → fc.
    ``zero_init_residual`` zeroes the last BN of each block (Goyal et al. 2017), as torchvision offers.
    """

    stage_paths = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, depth: int = 18, num_classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        self.depth = depth
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        blocks = LAYERS[depth]
        self.layer1 = self._make_layer(64, blocks[0], stride=1)
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Stage ``k`` of ``StagedModel``: 0 = stem+layer1, 1..3 = layer2..4, 4 = the head."""
        if k == 0:
            return self.layer1(self.relu(self.bn1(self.conv1(x))))
        if k == 1:
            return self.layer2(x)
        if k == 2:
            return self.layer3(x)
        if k == 3:
            return self.layer4(x)
        if k == 4:
            return self.fc(torch.flatten(self.avgpool(x), 1))
        raise IndexError(f"CifarResNet has stages 0..4 (4 = head), got {k}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        return f"ResNet-{self.depth} (CIFAR stem)"
