"""AlexNet with batch normalisation, in a CIFAR (32x32) and an ImageNet (224/227) geometry.

Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural Networks",
NIPS 2012: five convs (96, 256, 384, 384, 256 channels) and three fully connected layers. As in HWGQ
(Cai et al., CVPR 2017) and CMT-KD (Pham et al., WACV 2023), every conv and every hidden FC is
followed by BatchNorm; local response normalisation and channel groups are dropped.

``geometry = "cifar"`` (the default) shrinks the stem for 32x32 inputs (CMT-KD's CIFAR-100 AlexNet);
``geometry = "imagenet"`` is the Caffe / HWGQ ImageNet layout (11x11 stride-4 conv1, unpadded max
pools, 6x6 before ``fc6``; CMT-KD's Table 5). Both have the same module names and stages.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AlexNetBN"]


class AlexNetBN(nn.Module):
    """AlexNet-BN: ``conv1..conv5`` (each conv → BN → ReLU), ``fc6``, ``fc7`` (→ BN1d → ReLU), ``fc8``.

    ``geometry = "cifar"`` (default), for a 32x32 input (layer names as in the Caffe AlexNet)::

        conv1 5x5 96  → bn1 → relu1 → pool1 (max 3/2, pad 1)   32 → 16
        conv2 5x5 256 → bn2 → relu2 → pool2 (max 3/2, pad 1)   16 → 8     end of stage 0
        conv3 3x3 384 → bn3 → relu3
        conv4 3x3 384 → bn4 → relu4                                      end of stage 1
        conv5 3x3 256 → bn5 → relu5 → pool5 (max 3/2, pad 1)    8 → 4     end of stage 2
        avgpool (adaptive, 4x4) → flatten → fc6 → bn6 → relu6 → drop6 → fc7 → bn7 → relu7 → drop7 → fc8

    ``geometry = "imagenet"``, the Caffe / HWGQ layout, for a 224x224 or 227x227 input::

        conv1 11x11/4 96, pad 2 → bn1 → relu1 → pool1 (max 3/2)   224 → 55 → 27  (227 → 56 → 27)
        conv2 5x5 256, pad 2    → bn2 → relu2 → pool2 (max 3/2)    27 → 13        end of stage 0
        conv3 3x3 384 → bn3 → relu3
        conv4 3x3 384 → bn4 → relu4                                     13        end of stage 1
        conv5 3x3 256 → bn5 → relu5 → pool5 (max 3/2)               13 → 6         end of stage 2
        avgpool (adaptive, 6x6) → flatten → fc6 (256*6*6 → fc_width) → ... → fc8 (as above)

    Caffe's conv1 has no padding (227 → 55); padding 2 (torchvision's choice) gives 55 for a 224 input
    and 56 for 227, and both reach 27 after ``pool1`` and 6x6 after ``pool5``, so either crop size
    works with ``avgpool`` as the identity. With padding 0 a 224 input would end at 5x5 and ``avgpool``
    would have to stretch it to 6x6. The padding adds no parameters.

    The stages end after conv layers 2, 4 and 5 (CMT-KD's fusion points); ``stage_paths`` names the
    last module of each (``pool2``, ``relu4``, ``pool5``), so a fused feature is the pooled activation
    that the next conv reads. ``fc8`` (the logits) has no BN. Larger inputs work in both geometries:
    ``avgpool`` brings ``pool5``'s map to 4x4 (cifar) or 6x6 (imagenet), the identity at the nominal size.
    """

    stage_paths = ("pool2", "relu4", "pool5")
    channels = (96, 256, 384, 384, 256)
    geometries = ("cifar", "imagenet")

    def __init__(self, num_classes: int = 10, fc_width: int = 4096, dropout: float = 0.0, geometry: str = "cifar"):
        super().__init__()
        if geometry not in self.geometries:
            raise ValueError(f"geometry must be one of {', '.join(map(repr, self.geometries))}, got {geometry!r}")
        self.geometry = geometry
        c1, c2, c3, c4, c5 = self.channels
        if geometry == "cifar":
            conv1 = dict(kernel_size=5, stride=1, padding=2)
            pool_padding, pooled = 1, 4
        else:  # Caffe/HWGQ ImageNet AlexNet; conv1 padding 2 so that 224 and 227 inputs both end at 6x6
            conv1 = dict(kernel_size=11, stride=4, padding=2)
            pool_padding, pooled = 0, 6
        self.conv1 = nn.Conv2d(3, c1, bias=False, **conv1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=pool_padding)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=pool_padding)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c4)
        self.relu4 = nn.ReLU(inplace=True)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, bias=False)
        self.bn5 = nn.BatchNorm2d(c5)
        self.relu5 = nn.ReLU(inplace=True)
        self.pool5 = nn.MaxPool2d(3, stride=2, padding=pool_padding)
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.fc6 = nn.Linear(c5 * pooled * pooled, fc_width, bias=False)
        self.bn6 = nn.BatchNorm1d(fc_width)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc7 = nn.Linear(fc_width, fc_width, bias=False)
        self.bn7 = nn.BatchNorm1d(fc_width)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc8 = nn.Linear(fc_width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        """Stage ``k`` of ``StagedModel``: 0 = conv1-2, 1 = conv3-4, 2 = conv5, 3 = the FC head."""
        if k == 0:
            x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
            return self.pool2(self.relu2(self.bn2(self.conv2(x))))
        if k == 1:
            x = self.relu3(self.bn3(self.conv3(x)))
            return self.relu4(self.bn4(self.conv4(x)))
        if k == 2:
            return self.pool5(self.relu5(self.bn5(self.conv5(x))))
        if k == 3:
            x = torch.flatten(self.avgpool(x), 1)
            x = self.drop6(self.relu6(self.bn6(self.fc6(x))))
            x = self.drop7(self.relu7(self.bn7(self.fc7(x))))
            return self.fc8(x)
        raise IndexError(f"AlexNetBN has stages 0..3 (3 = head), got {k}")

    def forward(self, x: Tensor) -> Tensor:
        for k in range(4):
            x = self.forward_stage(k, x)
        return x
