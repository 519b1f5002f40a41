"""LSQ quantizer plugin against a reference written here from METHODS.md ("Quantizers", LSQ).

The reference computes the forward and both gradients element by element from the formulas
(``round(clamp(v/s))·s``; straight-through inside ``-Q_N <= v/s <= Q_P``; ``∂v̂/∂s`` = ``round(v/s) - v/s``
inside, ``-Q_N`` / ``Q_P`` outside; gradient scale ``1/sqrt(N·Q_P)``), in float64, without autograd
and without calling the plugin.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QUANT_PATHS, select_quant_path

import kdtoolkit_plugins.quantizers.lsq as lsq_plugin
from kdtoolkit.plugins import load_registry
from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer, LSQOptions, LSQQuantizer, LSQWeightQuantizer

BITS = range(1, 9)


@pytest.fixture(params=QUANT_PATHS)
def math_path(request, monkeypatch):
    """Run a test on the fused native kernels and on the ATen implementation (torch.compile: test_quant_reference.py)."""
    return select_quant_path(request.param, lsq_plugin, monkeypatch)


def q_range(bits: int, signed: bool) -> tuple[int, int]:
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_lsq(v, s, dy, q_n, q_p, n_per_step=None):
    """Forward, dv and ds (per tensor, or per output channel when ``s`` has one entry per row)."""
    s_b = s.view(-1, *([1] * (v.dim() - 1))) if s.dim() == 1 else s
    t = v / s_b
    forward = torch.round(torch.clamp(t, -q_n, q_p)) * s_b
    inside = (t >= -q_n) & (t <= q_p)
    dv = dy * inside
    local = torch.where(inside, torch.round(t) - t, torch.where(t < -q_n, float(-q_n), float(q_p)))
    n = v.numel() if n_per_step is None else n_per_step
    g = 1.0 / math.sqrt(n * q_p)
    if s.dim() == 1:
        ds = (dy * local).sum(dim=tuple(range(1, v.dim()))) * g
    else:
        ds = (dy * local).sum() * g
    return forward, dv, ds


def ref_binary(v, s, dy):
    s_b = s.view(-1, *([1] * (v.dim() - 1))) if s.dim() == 1 else s
    t = v / s_b
    sign = torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
    forward = sign * s_b
    inside = t.abs() <= 1
    dv = dy * inside
    local = torch.where(inside, sign - t, sign)
    g = 1.0 / math.sqrt(v.numel() // (s.numel() if s.dim() == 1 else 1))
    ds = (dy * local).sum(dim=tuple(range(1, v.dim()))) * g if s.dim() == 1 else (dy * local).sum() * g
    return forward, dv, ds


def spread_input(shape, step, q_n, q_p):
    """Random values over the whole range and beyond both ends (some exactly on the grid ends)."""
    lo, hi = -q_n * step, q_p * step
    width = max(hi - lo, step)
    x = lo - 0.3 * width + torch.rand(shape, dtype=torch.float64) * 1.6 * width
    flat = x.view(-1)
    flat[:4] = torch.tensor([lo, hi, 0.0, -step], dtype=torch.float64)
    return x


@pytest.mark.parametrize("bits", BITS)
def test_activation_forward_and_gradients_match_reference(bits, math_path):
    q_n, q_p = q_range(bits, signed=False)
    q = LSQActQuantizer(bits).double()
    step = 0.05 + torch.rand((), dtype=torch.float64).item()
    q.initialize(torch.ones(1, dtype=torch.float64))  # mark initialised, then set the step we want
    with torch.no_grad():
        q.step.fill_(step)
    x = spread_input((6, 5, 4, 4), step, q_n, q_p).requires_grad_()
    y = q(x)
    dy = torch.randn_like(y)
    dx, ds = torch.autograd.grad(y, [x, q.step], dy)
    ref_y, ref_dx, ref_ds = ref_lsq(x.detach(), q.step.detach(), dy, q_n, q_p)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    assert torch.equal(dx, ref_dx)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-9, atol=1e-12)
    # outputs lie on the unsigned grid {0, s, …, Q_P·s}
    k = y.detach() / step
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-9)
    assert torch.round(k).min() == 0 and torch.round(k).max() == q_p


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_forward_and_gradients_match_reference(bits, per_channel, math_path):
    q_n, q_p = q_range(bits, signed=True)
    w0 = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.2
    q = LSQWeightQuantizer(bits, w0, per_channel=per_channel)
    assert q.step.dtype == torch.float64
    with torch.no_grad():  # a step that is not the init value, so that both ends get clipped
        q.step.mul_(1.7 if bits > 2 else 0.6)
    w = spread_input(w0.shape, float(q.step.detach().mean()), q_n, q_p).requires_grad_()
    y = q(w)
    dy = torch.randn_like(y)
    dw, ds = torch.autograd.grad(y, [w, q.step], dy)
    n_per_step = w.numel() // w.shape[0] if per_channel else None
    ref_y, ref_dw, ref_ds = ref_lsq(w.detach(), q.step.detach(), dy, q_n, q_p, n_per_step)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    assert torch.equal(dw, ref_dw)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-9, atol=1e-12)
    s_b = q.step.detach().view(-1, 1, 1, 1) if per_channel else q.step.detach()
    k = y.detach() / s_b
    assert k.min() >= -q_n - 1e-9 and k.max() <= q_p + 1e-9


@pytest.mark.parametrize("per_channel", [False, True])
def test_one_bit_weights_are_sign_times_learned_scale(per_channel):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    q = LSQWeightQuantizer(1, w, per_channel=per_channel)
    mean_abs = w.abs().mean(dim=(1, 2, 3)) if per_channel else w.abs().mean()
    torch.testing.assert_close(q.step.detach(), mean_abs)  # init: least-squares binary scale
    with torch.no_grad():
        q.step.mul_(0.8)
    w = w.requires_grad_()
    y = q(w)
    dy = torch.randn_like(y)
    dw, ds = torch.autograd.grad(y, [w, q.step], dy)
    ref_y, ref_dw, ref_ds = ref_binary(w.detach(), q.step.detach(), dy)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-15)
    assert torch.equal(dw, ref_dw)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-9, atol=1e-12)
    assert len(torch.unique(y.detach()[0])) == 2
    # it trains: a few SGD steps on a least-squares target reduce the loss
    target = torch.sign(torch.randn_like(w)) * 0.5
    opt = torch.optim.SGD([w, q.step], lr=0.5)
    losses = []
    for _ in range(60):
        loss = (q(w) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_q_ranges_signed_and_unsigned():
    assert lsq_plugin.qrange(2, signed=True) == (2, 1)
    assert lsq_plugin.qrange(2, signed=False) == (0, 3)
    assert lsq_plugin.qrange(8, signed=True) == (128, 127)
    assert lsq_plugin.qrange(8, signed=False) == (0, 255)
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    signed = LSQActQuantizer(3, signed=True).double()
    signed.initialize(torch.ones(1))
    with torch.no_grad():
        signed.step.fill_(0.25)
    assert signed(x).min().item() == -4 * 0.25 and signed(x).max().item() == 3 * 0.25
    unsigned = LSQActQuantizer(3).double()
    unsigned.initialize(torch.ones(1))
    with torch.no_grad():
        unsigned.step.fill_(0.25)
    assert unsigned(x).min().item() == 0 and unsigned(x).max().item() == 7 * 0.25


def test_step_gradient_scale_is_one_over_sqrt_n_qp():
    bits, (_, q_p) = 3, q_range(3, signed=False)
    q = LSQActQuantizer(bits).double()
    q.initialize(torch.ones(1))
    with torch.no_grad():
        q.step.fill_(0.3)
    x = torch.rand(4, 7, 5, 5, dtype=torch.float64) * 3
    dy = torch.randn_like(x)
    (ds,) = torch.autograd.grad(q(x), [q.step], dy)
    t = x / 0.3
    inside = (t >= 0) & (t <= q_p)
    raw = (dy * torch.where(inside, torch.round(t) - t, torch.full_like(t, q_p) * (t > q_p))).sum()
    torch.testing.assert_close(ds * math.sqrt(x.numel() * q_p), raw)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_initial_steps(bits):
    q_p_w = 2 ** (bits - 1) - 1
    w = torch.randn(8, 4, 3, 3) * 0.1
    wq = LSQWeightQuantizer(bits, w)
    torch.testing.assert_close(wq.step.detach(), 2 * w.abs().mean() / math.sqrt(q_p_w))
    wq_c = LSQWeightQuantizer(bits, w, per_channel=True)
    torch.testing.assert_close(wq_c.step.detach(), 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(q_p_w))
    q_p_a = 2**bits - 1
    aq = LSQActQuantizer(bits)
    assert not aq.initialized
    first = torch.rand(16, 4, 6, 6) * 3
    aq(first)  # initialised from the first batch
    assert aq.initialized
    expected = 2 * first.abs().mean() / math.sqrt(q_p_a)
    torch.testing.assert_close(aq.step.detach(), expected)
    aq(torch.rand(16, 4, 6, 6) * 10)  # later batches do not re-initialise
    torch.testing.assert_close(aq.step.detach(), expected)
    aq.reset()
    second = torch.rand(16, 4, 6, 6)
    aq(second)
    torch.testing.assert_close(aq.step.detach(), 2 * second.abs().mean() / math.sqrt(q_p_a))


def test_activation_init_survives_state_dict_round_trip():
    trained = LSQActQuantizer(2)
    trained(torch.rand(8, 3, 4, 4))
    with torch.no_grad():
        trained.step.fill_(0.123)
    fresh = LSQActQuantizer(2)
    fresh.load_state_dict(trained.state_dict())
    fresh(torch.rand(8, 3, 4, 4) * 50)  # a loaded, initialised step is kept
    assert fresh.step.item() == pytest.approx(0.123)
    blank = LSQActQuantizer(2)
    blank.load_state_dict(LSQActQuantizer(2).state_dict())  # 'initialized' false: init from data
    batch = torch.rand(8, 3, 4, 4)
    blank(batch)
    assert blank.step.item() == pytest.approx((2 * batch.mean() / math.sqrt(3)).item(), rel=1e-6)


def test_no_host_sync_in_forward_backward_or_first_batch_init(monkeypatch):
    aq = LSQActQuantizer(2)
    wq = LSQWeightQuantizer(2, torch.randn(4, 4, 3, 3), per_channel=True)
    x = torch.rand(4, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside a training step")

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    (aq(x).sum() + wq(w).sum()).backward()  # includes the data-driven activation init
    monkeypatch.undo()
    assert aq.initialized.item() and aq.step.grad is not None and wq.step.grad is not None


@pytest.mark.parametrize("compute_dtype", ["input", "float32"])
def test_bf16_channels_last(compute_dtype, math_path):
    bits, (q_n, q_p) = 2, q_range(2, signed=False)
    q = LSQActQuantizer(bits, compute_dtype=compute_dtype)
    q.initialize(torch.ones(1))
    with torch.no_grad():
        q.step.fill_(0.375)  # exactly representable in bf16
    x = spread_input((8, 16, 5, 5), 0.375, q_n, q_p).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    dx, ds = torch.autograd.grad(y, [x, q.step], dy)
    assert dx.dtype == torch.bfloat16 and ds.dtype == torch.float32
    ref_y, ref_dx, ref_ds = ref_lsq(x.detach().double(), torch.tensor(0.375, dtype=torch.float64), dy.double(), q_n, q_p)
    # every path computes x/s in float32 in both modes, so only the output is rounded to bf16
    assert (y.double() == ref_y).float().mean() > 0.999
    assert torch.equal(dx.double(), ref_dx)
    torch.testing.assert_close(ds.double(), ref_ds, rtol=1e-4, atol=1e-6)


def test_plugin_registers_lsq_with_options():
    registry = load_registry(load_entrypoints=False, plugins=[lsq_plugin])
    component = registry.get("quantizer", "lsq")
    quantizer = component.factory(component.make_options(weight_bits=4, act_bits=4, per_channel=True))
    assert isinstance(quantizer, LSQQuantizer) and quantizer.name == "lsq"
    conv = torch.nn.Conv2d(3, 6, 3)
    wq = quantizer.weight_quantizer(4, conv)
    assert wq.step.shape == (6,) and wq.bits == 4
    assert quantizer.act_quantizer(4, conv).bits == 4
    with pytest.raises(ValueError):
        LSQOptions(act_bits=0)
