"""A quantizer: factory(options) -> an object with weight_quantizer(bits, module) and
act_quantizer(bits, module), each returning an nn.Module fake-quantizer (straight-through gradients)."""

import attrs
import torch
from torch import nn

from kdtoolkit.api import QuantizedWeight, bits_validator, positive


@attrs.frozen
class UniformOptions:
    weight_bits: int = attrs.field(default=4, validator=bits_validator)  # every quantizer has these two
    act_bits: int = attrs.field(default=4, validator=bits_validator)
    act_clip: float = attrs.field(default=4.0, validator=positive)


def _ste_round(x):
    return x + (torch.round(x) - x).detach()  # rounds forward, identity gradient


class UniformWeight(nn.Module):
    """Symmetric per-tensor grid: w ≈ s·q, q in [-2^(b-1), 2^(b-1) - 1], s = max|w| / 2^(b-1)."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.half = 2 ** (bits - 1)

    def _step(self, weight):
        return weight.detach().abs().amax().clamp_min(1e-8) / self.half

    def forward(self, weight):
        s = self._step(weight)
        q = torch.round(weight / s).clamp(-self.half, self.half - 1) * s
        return weight + (q - weight).detach()  # the grid value forward, identity gradient

    def export(self, weight):
        s = self._step(weight).float()
        codes = (torch.round(weight.detach().float() / s).clamp(-self.half, self.half - 1) + self.half).to(torch.uint8)
        return QuantizedWeight(codes=codes, scale=s, offset=-float(self.half), bits=self.bits)


class UniformAct(nn.Module):
    """Clip to [0, c], then 2^b - 1 uniform levels."""

    def __init__(self, bits, clip):
        super().__init__()
        self.bits, self.clip = bits, clip
        self.levels = 2**bits - 1

    def forward(self, x):
        s = self.clip / self.levels
        return _ste_round(x.clamp(0, self.clip) / s) * s


class UniformQuantizer:
    name = "uniform"

    def __init__(self, options):
        self.options = options

    def weight_quantizer(self, bits, module):
        return UniformWeight(bits)

    def act_quantizer(self, bits, module):
        return UniformAct(bits, self.options.act_clip)
