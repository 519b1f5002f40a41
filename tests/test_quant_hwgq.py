"""HWGQ quantizer plugin against a reference written here from METHODS.md ("Quantizers", HWGQ).

The references are deliberately naive (nearest level by argmin over the explicit level set, masks by
comparisons) and never call the plugin's code; the step tables are copied from METHODS.md.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUANT_PATHS, select_quant_path

import kdtoolkit_plugins.quantizers.hwgq as hwgq_plugin
from kdtoolkit.errors import ConfigError
from kdtoolkit.plugins import load_registry
from kdtoolkit_plugins.quantizers.hwgq import (
    HWGQActQuantizer,
    HWGQOptions,
    HWGQQuantizer,
    HWGQWeightQuantizer,
)

# METHODS.md, HWGQ step table
W_STEP = [None, 1.5958, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308]
A_STEP = [None, 0.7979, 0.5388, 0.3217, 0.1842, 0.1030, 0.0566, 0.0307, 0.0165]
BITS = range(1, 9)


@pytest.fixture(params=QUANT_PATHS)
def math_path(request, monkeypatch):
    """Run a test on the fused native kernels and on the ATen implementation (torch.compile: test_quant_reference.py)."""
    return select_quant_path(request.param, hwgq_plugin, monkeypatch)


def ref_act(x: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """q(x) = 0 for x <= 0; caffe: nearest of Δ..(2^b-1)Δ; round: Δ·clamp(round(x/Δ), 0, 2^b-1)."""
    delta = A_STEP[bits]
    top = 2**bits - 1
    if rounding == "round":
        return delta * torch.clamp(torch.round(x / delta), 0, top)
    levels = delta * torch.arange(1, top + 1, dtype=x.dtype)
    nearest = levels[(x.reshape(-1, 1) - levels).abs().argmin(dim=1)].reshape(x.shape)
    return torch.where(x > 0, nearest, torch.zeros_like(x))


def ref_act_grad(x: torch.Tensor, bits: int, dy: torch.Tensor) -> torch.Tensor:
    clip = (2**bits - 1) * A_STEP[bits]
    return dy * ((x > 0) & (x <= clip)).to(dy.dtype)


def ref_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest of ±Δ/2, ±3Δ/2, …, ±(2^(b-1) - 1/2)Δ with Δ = w_step[b]·std(W)."""
    delta = W_STEP[bits] * w.std()
    half = 2 ** (bits - 1)
    levels = delta * (torch.arange(-half, half, dtype=w.dtype) + 0.5)
    return levels[(w.reshape(-1, 1) - levels).abs().argmin(dim=1)].reshape(w.shape)


def act_input(bits: int, n: int = 4000, dtype=torch.float64) -> torch.Tensor:
    """Fresh random inputs: negatives, zeros, the whole range and well beyond the clip point."""
    clip = (2**bits - 1) * A_STEP[bits]
    x = torch.cat([torch.randn(n, dtype=dtype), torch.rand(n, dtype=dtype) * 1.5 * clip, torch.zeros(20, dtype=dtype)])
    return x[torch.randperm(x.numel())].reshape(-1, 5, 2, 2)


@pytest.mark.parametrize("rounding", ["caffe", "round"])
@pytest.mark.parametrize("bits", BITS)
def test_activation_forward_and_backward_match_reference(bits, rounding, math_path):
    q = HWGQActQuantizer(bits, rounding=rounding)
    x = act_input(bits).requires_grad_()
    y = q(x)
    torch.testing.assert_close(y, ref_act(x.detach(), bits, rounding), rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, ref_act_grad(x.detach(), bits, dy), rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_activation_level_set_and_clipping(bits):
    delta = A_STEP[bits]
    top = 2**bits - 1
    x = act_input(bits, n=20000)
    y = HWGQActQuantizer(bits)(x)
    k = y / delta
    # the set of outputs is exactly {0, Δ, …, (2^b − 1)Δ}: every level is reached, nothing else appears
    assert torch.equal(torch.unique(torch.round(k)), torch.arange(0, top + 1, dtype=y.dtype))
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-9)
    assert (y[x <= 0] == 0).all()
    assert (y[x > 0] >= delta * (1 - 1e-12)).all()  # caffe: every x > 0 gives at least Δ
    assert (y[x > top * delta] == y.max()).all()  # clipping
    assert torch.isclose(y.max(), torch.tensor(top * delta, dtype=y.dtype))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_backward_mask_boundaries(bits, math_path):
    clip = (2**bits - 1) * A_STEP[bits]
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-9, clip / 2, clip, clip + 1e-9, 10 * clip], dtype=torch.float64)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(HWGQActQuantizer(bits)(x), x, torch.ones_like(x))
    # mask 0 < x <= (2^b − 1)Δ: the clip point itself passes the gradient, zero does not
    assert dx.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_round_variant_differs_from_caffe_only_below_half_step():
    x = torch.tensor([0.1, 0.2, 0.3, 0.6, 1.2], dtype=torch.float64)
    caffe = HWGQActQuantizer(2, rounding="caffe")(x)
    plain = HWGQActQuantizer(2, rounding="round")(x)
    assert plain.tolist()[:2] == [0.0, 0.0]  # 0.1, 0.2 < Δ/2 = 0.2694
    assert caffe.tolist()[:2] == [A_STEP[2], A_STEP[2]]
    assert caffe[2:].tolist() == plain[2:].tolist()


@pytest.mark.parametrize("bits", BITS)
def test_weight_forward_levels_and_straight_through(bits):
    w = (torch.randn(16, 8, 3, 3, dtype=torch.float64) * torch.rand(()) * 0.3).requires_grad_()
    q = HWGQWeightQuantizer(bits)
    wq = q(w)
    torch.testing.assert_close(wq, ref_weight(w.detach(), bits), rtol=0, atol=1e-12)
    delta = W_STEP[bits] * w.detach().std()
    half = 2 ** (bits - 1)
    k = wq.detach() / delta - 0.5  # levels ±Δ/2, ±3Δ/2, … are (k + 1/2)Δ with integer k in [-half, half)
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-9)
    assert k.min() >= -half - 1e-9 and k.max() <= half - 1 + 1e-9
    dy = torch.randn_like(wq)
    (dw,) = torch.autograd.grad(wq, w, dy)
    assert torch.equal(dw, dy)  # backward: identity


def test_weight_clipping_at_outermost_level():
    w = torch.randn(1000, dtype=torch.float64)
    w[0], w[1] = 100.0, -100.0
    delta = W_STEP[2] * w.std()
    wq = HWGQWeightQuantizer(2)(w)
    torch.testing.assert_close(wq[:2], torch.stack([1.5 * delta, -1.5 * delta]))


def test_one_bit_weights_std_and_mean_abs():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    std_q = HWGQWeightQuantizer(1, binary="std")(w)
    torch.testing.assert_close(std_q, torch.where(w >= 0, 1.0, -1.0).double() * 0.798 * w.std(), rtol=1e-3, atol=0)
    mean_q = HWGQWeightQuantizer(1, binary="mean_abs")(w)
    per_filter = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(mean_q, torch.where(w >= 0, 1.0, -1.0).double() * per_filter, rtol=0, atol=1e-15)


def test_weight_step_uses_device_std_without_item(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    q = HWGQWeightQuantizer(2)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    q(w).sum().backward()


@pytest.mark.parametrize("compute_dtype", ["input", "float32"])
@pytest.mark.parametrize("bits", [2, 4])
def test_activation_bf16_channels_last(bits, compute_dtype, math_path):
    delta = A_STEP[bits]
    x64 = act_input(bits, n=1990).reshape(-1, 8, 5, 5)
    xb = x64.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    q = HWGQActQuantizer(bits, compute_dtype=compute_dtype)
    y = q(xb)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = ref_act(xb.detach().double(), bits, "caffe")  # exact reference on the same (bf16) inputs
    err = (y.double() - ref).abs()
    same_level = err <= 2**-8 * ref.abs()  # the right level, up to the bf16 rounding of the level
    assert same_level.all()  # every path divides in float32, whatever the input dtype
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, xb, dy)
    assert dx.dtype == torch.bfloat16
    # the mask compares the bf16 input with the exact clip point, in both modes
    assert torch.equal(dx.double(), ref_act_grad(xb.detach().double(), bits, dy.double()))


def test_plugin_registers_hwgq_with_options():
    registry = load_registry(load_entrypoints=False, plugins=[hwgq_plugin])
    component = registry.get("quantizer", "hwgq")
    quantizer = component.factory(component.make_options(weight_bits=3, act_bits=4, act_rounding="round"))
    assert isinstance(quantizer, HWGQQuantizer) and quantizer.name == "hwgq"
    conv = torch.nn.Conv2d(4, 4, 3)
    assert quantizer.weight_quantizer(3, conv).bits == 3
    act = quantizer.act_quantizer(4, conv)
    assert act.bits == 4 and act.rounding == "round"
    with pytest.raises(ValueError):
        HWGQOptions(weight_bits=9)
    with pytest.raises(ValueError):
        HWGQOptions(act_rounding="nearest")
    with pytest.raises(ConfigError):
        registry.get("quantizer", "nope")
