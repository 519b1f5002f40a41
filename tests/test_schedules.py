"""Schedule plugins against their definitions."""

import math

import pytest

from kdtoolkit.config.load import make_converter


def make(registry, name, **options):
    comp = registry.get("schedule", name)
    opts = make_converter(registry).structure(options, comp.options)
    return comp.factory(opts)


def test_multistep(registry):
    s = make(registry, "multistep", milestones=[60, 120, 160], gamma=0.2)
    assert s(0, 200) == 1.0 and s(59.99, 200) == 1.0
    assert s(60, 200) == pytest.approx(0.2) and s(130.5, 200) == pytest.approx(0.04)
    assert s(199, 200) == pytest.approx(0.2**3)


def test_cosine_with_warmup(registry):
    s = make(registry, "cosine", warmup_epochs=2)
    assert s(1.0, 10) == pytest.approx(0.5)
    assert s(2.0, 10) == pytest.approx(1.0)
    assert s(6.0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(10.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_piecewise_steps_and_interpolation(registry):
    s = make(registry, "piecewise", epochs=[0, 10], values=[1.0, 0.0])
    assert s(9.9, 20) == 1.0 and s(10, 20) == 0.0
    lin = make(registry, "piecewise", epochs=[0, 10], values=[0.0, 1.0], interpolate=True)
    assert lin(5, 20) == pytest.approx(0.5) and lin(15, 20) == 1.0


def test_piecewise_lengths_must_match():
    from kdtoolkit.config.validators import FieldError
    from kdtoolkit_plugins.schedules import PiecewiseOptions

    with pytest.raises(FieldError, match="one value per epoch"):
        PiecewiseOptions(epochs=(0.0, 10.0), values=(1.0,))


def test_schedules_are_pure(registry):
    s = make(registry, "cosine")
    assert [s(e / 3, 7) for e in range(21)] == [s(e / 3, 7) for e in range(21)]
