"""Schedule plugins: multipliers of a learning rate or a loss weight over training.

All are pure functions of ``(epoch, total_epochs)`` (``epoch`` fractional), so resumed runs are exact.
"""

from __future__ import annotations

import bisect
import math

import attrs

import kdtoolkit
from kdtoolkit.api import FieldError, non_negative, positive


def _sorted_epochs(inst, attribute, value):
    if list(value) != sorted(value):
        raise FieldError(attribute.name, f"must be in increasing order, got {list(value)}")


@attrs.frozen
class ConstantOptions:
    value: float = 1.0


@attrs.frozen
class MultiStepOptions:
    """lr x ``gamma`` at each epoch in ``milestones`` (torch's MultiStepLR)."""

    milestones: tuple[int, ...] = attrs.field(default=(), validator=_sorted_epochs)
    gamma: float = attrs.field(default=0.1, validator=positive)
    warmup_epochs: float = attrs.field(default=0.0, validator=non_negative)


@attrs.frozen
class CosineOptions:
    """Cosine decay from 1 to ``final`` over training, after an optional linear warm-up."""

    final: float = attrs.field(default=0.0, validator=non_negative)
    warmup_epochs: float = attrs.field(default=0.0, validator=non_negative)
    per_step: bool = True


@attrs.frozen
class PiecewiseOptions:
    """Values that hold from given epochs: ``epochs = [0, 10]``, ``values = [1.0, 0.0]`` is 1 for
    epochs 0-9 and 0 from epoch 10 on (FitNet's hint-then-KD stages are two such schedules)."""

    epochs: tuple[float, ...] = attrs.field(default=(0.0,), validator=_sorted_epochs)
    values: tuple[float, ...] = (1.0,)
    interpolate: bool = False

    def __attrs_post_init__(self):
        if len(self.epochs) != len(self.values):
            raise FieldError("values", f"needs one value per epoch ({len(self.epochs)}), got {len(self.values)}")


def _warmup(epoch: float, warmup_epochs: float) -> float:
    return min(1.0, (epoch + 1e-12) / warmup_epochs) if warmup_epochs > 0 else 1.0


class Constant:
    def __init__(self, options: ConstantOptions):
        self.value = options.value

    def __call__(self, epoch, total_epochs):
        return self.value


class MultiStep:
    def __init__(self, options: MultiStepOptions):
        self.o = options

    def __call__(self, epoch, total_epochs):
        passed = bisect.bisect_right(self.o.milestones, math.floor(epoch))
        return self.o.gamma**passed * _warmup(epoch, self.o.warmup_epochs)


class Cosine:
    def __init__(self, options: CosineOptions):
        self.o = options

    def __call__(self, epoch, total_epochs):
        t = epoch if self.o.per_step else math.floor(epoch)
        w = self.o.warmup_epochs
        if t < w:
            return _warmup(t, w)
        frac = min(1.0, (t - w) / max(total_epochs - w, 1e-12))
        return self.o.final + (1 - self.o.final) * 0.5 * (1 + math.cos(math.pi * frac))


class Piecewise:
    def __init__(self, options: PiecewiseOptions):
        self.o = options

    def __call__(self, epoch, total_epochs):
        e, v = self.o.epochs, self.o.values
        i = bisect.bisect_right(e, epoch) - 1
        if i < 0:
            return v[0]
        if not self.o.interpolate or i + 1 >= len(e):
            return v[i]
        frac = (epoch - e[i]) / (e[i + 1] - e[i])
        return v[i] + frac * (v[i + 1] - v[i])


@kdtoolkit.hookimpl
def register_schedules(register):
    register("constant", Constant, options=ConstantOptions, description="a constant multiplier")
    register("multistep", MultiStep, options=MultiStepOptions, description="x gamma at each milestone epoch")
    register("cosine", Cosine, options=CosineOptions, description="cosine decay, optional linear warm-up")
    register("piecewise", Piecewise, options=PiecewiseOptions, description="values from given epochs (steps or linear)")
