"""A dataset, a model, a loss, a fusion and a schedule: each an options class and a factory."""

import attrs
import torch
from torch import nn

from kdtoolkit.api import DatasetSplits, TensorSplit, positive


# --- dataset: factory(options, *, root, download) -> DatasetSplits --------------------------------

@attrs.frozen
class BlobsOptions:
    num_classes: int = attrs.field(default=3, validator=positive)
    train_size: int = attrs.field(default=96, validator=positive)
    test_size: int = attrs.field(default=48, validator=positive)
    image_size: int = attrs.field(default=8, validator=positive)


def _blobs(n, options, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, options.num_classes, (n,), generator=g)
    colours = torch.linspace(40, 215, options.num_classes).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    noise = torch.randint(-40, 40, (n, 3, options.image_size, options.image_size), generator=g)
    return TensorSplit(images=(colours[labels] + noise).clamp(0, 255).to(torch.uint8), labels=labels)


def Blobs(options, *, root, download):
    return DatasetSplits(train=_blobs(options.train_size, options, 0), test=_blobs(options.test_size, options, 1),
                         num_classes=options.num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                         image_size=(options.image_size, options.image_size), name="blobs")


# --- model: factory(options, *, num_classes) -> nn.Module (a StagedModel here) ---------------------

@attrs.frozen
class TinyConvNetOptions:
    width: int = attrs.field(default=8, validator=positive)


class TinyConvNet(nn.Module):
    stage_paths = ("conv1", "conv2")  # module paths ending each stage: "student:stages" refers to them

    def __init__(self, options, *, num_classes):
        super().__init__()
        w = options.width
        self.conv1 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * w, num_classes)

    def forward_stage(self, k, x):
        return [self.conv1, self.conv2, lambda h: self.fc(h.mean(dim=(2, 3)))][k](x)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).mean(dim=(2, 3)))


# --- loss: factory(options) -> nn.Module with `inputs`; forward(**inputs) -> scalar -----------------

@attrs.frozen
class L1LogitsOptions:
    scale: float = attrs.field(default=1.0, validator=positive)


class L1Logits(nn.Module):
    inputs = ("student", "teacher")  # its tensor arguments, bound by the [[losses]] term's inputs
    detach = ("teacher",)            # inputs it treats as targets: the core detaches them

    def __init__(self, options):
        super().__init__()
        self.scale = options.scale

    def forward(self, student, teacher):
        return self.scale * (student - teacher).abs().mean()


# --- fusion: factory(options, *, num_inputs) -> nn.Module; forward(tensors, temperature=None) -------

class MaxLogits(nn.Module):
    def __init__(self, options, *, num_inputs):
        super().__init__()
        self.num_inputs = num_inputs

    def forward(self, tensors, temperature=None):
        return torch.stack(list(tensors)).amax(dim=0)


# --- schedule: factory(options) -> callable(epoch: float, total_epochs: int) -> float ---------------

@attrs.frozen
class WarmupOptions:
    epochs: float = attrs.field(default=1.0, validator=positive)


class Warmup:
    def __init__(self, options):
        self.epochs = options.epochs

    def __call__(self, epoch, total_epochs):
        return min(1.0, epoch / self.epochs)
