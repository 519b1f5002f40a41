"""First-party model plugin: CIFAR WRN and ResNet, AlexNet-BN, and torchvision's classifiers.

This module only declares the options and registers the factories; each architecture lives in its own
module, imported when a model is built (listing plugins does not import torch).
"""

from __future__ import annotations

import attrs

import kdtoolkit
from kdtoolkit.api import FieldError, check, in_range, one_of, positive

__all__ = [
    "AlexNetOptions", "CifarResNetOptions", "TorchvisionOptions", "WRNOptions", "build_alexnet_bn",
    "build_resnet_cifar", "build_torchvision", "build_wrn", "register_models",
]

_dropout = in_range(0.0, 0.999)


@attrs.frozen
class WRNOptions:
    """``wrn``: WRN-``depth``-``width`` (depth 6n+4: 10, 16, 22, 28, 40, ...)."""

    depth: int = attrs.field(
        default=16,
        validator=check(lambda d: d >= 10 and (d - 4) % 6 == 0, "must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {value!r}"),
    )
    width: int = attrs.field(default=1, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=_dropout)


@attrs.frozen
class CifarResNetOptions:
    """``resnet18_cifar``: torchvision-style ResNet with a CIFAR stem; ``depth`` 18 or 34."""

    depth: int = attrs.field(default=18, validator=one_of((18, 34)))
    zero_init_residual: bool = False


@attrs.frozen
class AlexNetOptions:
    """``alexnet_bn``: width of the two hidden FC layers and their dropout (0 = none; BN follows each);
    ``geometry`` "cifar" (5x5 stem, 32x32 inputs) or "imagenet" (Caffe/HWGQ 11x11 stride-4 stem, 224/227)."""

    fc_width: int = attrs.field(default=4096, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=_dropout)
    geometry: str = attrs.field(default="cifar", validator=one_of(("cifar", "imagenet")))


def _check_arch(instance, attribute, value):
    from kdtoolkit_plugins.models.torchvision_models import check_arch

    try:
        check_arch(value)
    except ValueError as exc:
        raise FieldError(attribute.name, str(exc)) from None


@attrs.frozen
class TorchvisionOptions:
    """``torchvision``: a torchvision classifier by name; ImageNet weights only when ``pretrained``."""

    arch: str = attrs.field(default="resnet18", validator=_check_arch)
    pretrained: bool = False


def build_wrn(options: WRNOptions | None = None, *, num_classes: int):
    from kdtoolkit_plugins.models.wrn import WideResNet

    options = options or WRNOptions()
    return WideResNet(options.depth, options.width, num_classes=num_classes, dropout=options.dropout)


def build_resnet_cifar(options: CifarResNetOptions | None = None, *, num_classes: int):
    from kdtoolkit_plugins.models.resnet_cifar import CifarResNet

    options = options or CifarResNetOptions()
    return CifarResNet(options.depth, num_classes=num_classes, zero_init_residual=options.zero_init_residual)


def build_alexnet_bn(options: AlexNetOptions | None = None, *, num_classes: int):
    from kdtoolkit_plugins.models.alexnet import AlexNetBN

    options = options or AlexNetOptions()
    return AlexNetBN(num_classes=num_classes, fc_width=options.fc_width, dropout=options.dropout,
                     geometry=options.geometry)


def build_torchvision(options: TorchvisionOptions | None = None, *, num_classes: int):
    from kdtoolkit_plugins.models.torchvision_models import build_torchvision_model

    options = options or TorchvisionOptions()
    return build_torchvision_model(options.arch, num_classes=num_classes, pretrained=options.pretrained)


@kdtoolkit.hookimpl
def register_models(register):
    register("wrn", build_wrn, options=WRNOptions,
             description="CIFAR wide ResNet WRN-d-k (Zagoruyko & Komodakis, BMVC 2016); staged")
    register("resnet18_cifar", build_resnet_cifar, options=CifarResNetOptions,
             description="ResNet-18/34 with a 3x3 stem, no max-pool (He et al., CVPR 2016); staged")
    register("alexnet_bn", build_alexnet_bn, options=AlexNetOptions,
             description="AlexNet with BN after every conv and hidden FC (HWGQ, CMT-KD); geometry "
                         "'cifar' (32x32) or 'imagenet' (224/227); staged")
    register("torchvision", build_torchvision, options=TorchvisionOptions,
             description="any torchvision classifier by arch name; ResNets staged")
