"""Any torchvision classification model by name, with stage support for the ResNet family.

Architectures are those of ``torchvision.models.list_models(module=torchvision.models)`` (ResNets,
MobileNets, EfficientNets, VGG, ViT, ...). ResNet, ResNeXt and wide-ResNet models come back as a
``StagedResNet``: the very same module (same parameters, same paths, same state dict) with
``stage_paths`` and ``forward_stage`` added.
"""

from __future__ import annotations

import difflib

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["StagedResNet", "available_archs", "build_torchvision_model", "check_arch", "replace_head"]

#: torchvision builders that take ``aux_logits`` (auxiliary heads make ``forward`` return a tuple).
_AUX_LOGITS = ("googlenet", "inception_v3")


class StagedResNet(torchvision.models.ResNet):
    """torchvision's ResNet with ``StagedModel`` support (He et al., CVPR 2016).

    Stages end at ``layer1`` .. ``layer4``; stage 0 includes the stem (``conv1 → bn1 → relu →
    maxpool``), the head is ``avgpool → flatten → fc``. Built by re-classing a model made by
    torchvision, so pretrained weights and module paths are torchvision's.
    """

    stage_paths = ("layer1", "layer2", "layer3", "layer4")

    def forward_stage(self, k: int, x: Tensor) -> Tensor:
        if k == 0:
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        if k in (1, 2, 3):
            return getattr(self, f"layer{k + 1}")(x)
        if k == 4:
            return self.fc(torch.flatten(self.avgpool(x), 1))
        raise IndexError(f"StagedResNet has stages 0..4 (4 = head), got {k}")


def available_archs() -> list[str]:
    """Names of torchvision's classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` (with the closest names) unless ``arch`` is a torchvision classifier."""
    archs = available_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(archs)}"
        raise ValueError(f"unknown torchvision classification model {arch!r}{hint}")


def build_torchvision_model(arch: str, *, num_classes: int, pretrained: bool = False) -> nn.Module:
    """Build ``arch``; with ``pretrained`` load torchvision's default ImageNet weights.

    Weights are downloaded (to torch's hub cache) only when ``pretrained`` is true. With pretrained
    weights and ``num_classes != 1000`` the classifier layer is replaced by a fresh one of the right
    size (see ``replace_head``). Inception v3 and GoogLeNet are built without auxiliary heads.
    """
    check_arch(arch)
    kwargs = {"aux_logits": False} if arch in _AUX_LOGITS else {}
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
        pretrained_classes = len(weights.meta["categories"])
        if num_classes != pretrained_classes:
            replace_head(model, pretrained_classes, num_classes)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if type(model) is torchvision.models.ResNet:
        model.__class__ = StagedResNet
    return model


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> str:
    """Replace the last ``Linear`` (or 1x1 ``Conv2d``, SqueezeNet) with ``old_classes`` outputs.

    The new layer has the same input size and bias setting, ``num_classes`` outputs and PyTorch's
    default initialisation. Returns the replaced module's path.
    """
    path, head = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == old_classes:
            path, head = name, module
        elif isinstance(module, nn.Conv2d) and module.out_channels == old_classes:
            path, head = name, module
    if head is None:
        raise ValueError(f"{type(model).__name__}: no classifier layer with {old_classes} outputs to replace")
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(
            head.in_channels, num_classes, head.kernel_size, stride=head.stride, padding=head.padding,
            bias=head.bias is not None,
        )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return path
