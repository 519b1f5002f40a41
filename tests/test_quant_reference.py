"""Every path of the LSQ and HWGQ quantizers against one float64 reference written here from the formulas.

The definition (METHODS.md "Quantizers", with the precision of kdtoolkit.quant.ops): the quotient
``t = x/s`` is the float32 quotient of the float32 values (float64 for float64 tensors), the level
``k = round(clamp(t))`` (half to even), the output the float32 product ``k·s`` stored in the input's
dtype; LSQ's step gradient is ``g·Σ dy·∂v̂/∂s`` with ``∂v̂/∂s = round(t) − t`` inside ``[−Q_N, Q_P]``
and ``−Q_N``/``Q_P`` outside. The reference computes all of it in float64 (rounding ``t`` to float32
is the only float32 step: a float64 quotient of float32 values rounded to float32 is the correctly
rounded float32 quotient), without autograd and without the plugin.

Paths: ``native`` (the fused C kernels), ``aten`` (the ATen implementation: what runs on CUDA, for
per-channel steps, strided tensors and without a compiler) and ``compiled`` (``torch.compile`` with
``fullgraph=True``, i.e. the custom ops traced with their fake implementations and autograd
registration). Levels and input gradients must be exact; the step gradient within
``2^-22·g·Σ|dy·∂v̂/∂s|`` plus the rounding of the result to float32, a bound that does not depend on
the tensor's size.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import native_kernels_or_skip

from kdtoolkit.quant import native
from kdtoolkit_plugins.quantizers.hwgq import A_STEP, HWGQActQuantizer
from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer, LSQWeightQuantizer

PATHS = ["native", "aten", "compiled"]
BIG = 8 * 1024 * 1024


@pytest.fixture(params=PATHS)
def path(request):
    if request.param == "native":
        native_kernels_or_skip()
    return request.param


def run(path: str, module, x: torch.Tensor, dy: torch.Tensor):
    """``module(x)`` and the gradients of ``<module(x), dy>`` on ``path``."""
    x = x.detach().requires_grad_(True)
    if path == "compiled":
        torch._dynamo.reset()  # a fresh trace per case (new modules, dtypes and shapes)
    fn = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False) if path == "compiled" else module
    context = native.disabled() if path == "aten" else contextlib.nullcontext()
    with context:
        y = fn(x)
        y.backward(dy)
    return y.detach(), x.grad


def quotient(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The float32 quotient (float64 for float64 ``x``) of the values of ``x`` and ``s``, as float64."""
    t = x.double() / s.double()
    return t if x.dtype == torch.float64 else t.float().double()


def stored(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact float64 product stored as float32 (float64 for float64), then in ``dtype``."""
    return value if dtype == torch.float64 else value.float().to(dtype)


def ref_lsq(x, s, dy, q_n, q_p, g):
    """(output, dx, d_step, bound on |d_step error|) for a step ``s`` (0-dim, or (C,) per row)."""
    s = s.detach().double()
    s_b = s.view(-1, *([1] * (x.dim() - 1))) if s.dim() == 1 else s
    t = quotient(x, s_b)
    k = torch.round(torch.clamp(t, -q_n, q_p))
    y = stored(k * s_b, x.dtype)
    inside = (t >= -q_n) & (t <= q_p)
    dx = torch.where(inside, dy, torch.zeros_like(dy))
    local = torch.where(inside, torch.round(t) - t, torch.clamp(t, -q_n, q_p))
    terms = dy.double() * local
    dims = tuple(range(x.dim())) if s.dim() == 0 else tuple(range(1, x.dim()))
    ds = terms.sum(dim=dims) * g
    bound = 2.0**-22 * g * terms.abs().sum(dim=dims) + 2.0**-23 * ds.abs()
    return y, dx, ds, bound


def ref_hwgq(x, bits, caffe, dy):
    levels = 2**bits - 1
    delta = torch.tensor(A_STEP[bits], dtype=torch.float64)  # Δ's float32 value (float64 for float64)
    delta = delta if x.dtype == torch.float64 else delta.float().double()
    t = quotient(x, delta)
    k = torch.clamp(torch.round(t), 1 if caffe else 0, levels)
    value = torch.where(x.double() <= 0, 0.0, k * delta) if caffe else k * delta
    y = stored(value, x.dtype)
    xd = x.double()
    dx = torch.where((xd > 0) & (xd <= levels * A_STEP[bits]), dy, torch.zeros_like(dy))
    return y, dx


def activations(n: int, dtype, seed: int) -> torch.Tensor:
    """N(0, 1.5²) values (negatives, and positives past the top level), shaped (B, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 1.5).to(dtype).view(-1, 4, 16, 16)


def upstream(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    if kind == "constant":  # the gradient of a mean: the case where cancellation was worst
        return torch.full_like(x, 1.0 / x.numel())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen).to(x.dtype)


def check_lsq(path, x, dy, bits, signed=False):
    q = LSQActQuantizer(bits, signed=signed)
    q.initialize(x.float())
    y, dx = run(path, q, x, dy)
    g = 1.0 / math.sqrt(x.numel() * q.q_p)
    y_ref, dx_ref, ds_ref, bound = ref_lsq(x, q.step, dy, q.q_n, q.q_p, g)
    assert y.dtype == x.dtype and torch.equal(y.double(), y_ref.double()), "levels differ from the reference"
    assert torch.equal(dx, dx_ref.to(dx.dtype))
    err = (q.step.grad.double() - ds_ref).abs()
    assert err <= bound, f"step gradient off by {err.item():.3g}, bound {bound.item():.3g} (value {ds_ref.item():.4g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grad", ["constant", "random"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_activation_every_path(path, dtype, grad, bits):
    x = activations(4096 * 3, dtype, seed=bits)
    check_lsq(path, x, upstream(x, grad, seed=7), bits)
    check_lsq(path, x, upstream(x, grad, seed=8), bits, signed=True)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_lsq_weight_every_path(path, per_channel, bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    dy = torch.randn(w.shape, generator=gen)
    q = LSQWeightQuantizer(bits, w, per_channel=per_channel)
    y, dw = run(path, q, w, dy)
    n = w[0].numel() if per_channel else w.numel()
    y_ref, dw_ref, ds_ref, bound = ref_lsq(w, q.step, dy, q.q_n, q.q_p, 1.0 / math.sqrt(n * q.q_p))
    assert torch.equal(y.double(), y_ref) and torch.equal(dw, dw_ref)
    assert ((q.step.grad.double() - ds_ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("caffe", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
def test_hwgq_activation_every_path(path, dtype, caffe, bits):
    x = activations(4096 * 3, dtype, seed=bits)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, A_STEP[bits] * (2**bits - 1), A_STEP[bits] / 2]).to(dtype)
    dy = upstream(x, "random", seed=3)
    y, dx = run(path, HWGQActQuantizer(bits, rounding="caffe" if caffe else "round"), x, dy)
    y_ref, dx_ref = ref_hwgq(x, bits, caffe, dy)
    assert y.dtype == x.dtype and torch.equal(y.double(), y_ref.double())
    assert torch.equal(dx, dx_ref)


def test_strided_and_channels_last_inputs_take_the_same_numbers():
    """Inputs the kernels refuse (strided views) and accept (channels-last) give the reference's numbers."""
    x = activations(4096 * 4, torch.float32, seed=5)
    dy = upstream(x, "random", seed=6)
    for view, dview in ((x.transpose(2, 3), dy.transpose(2, 3)), (x[:, :, ::2], dy[:, :, ::2]),
                        (x.contiguous(memory_format=torch.channels_last), dy)):
        check_lsq("native" if native.status()["available"] else "aten", view, dview, 4)


# ---------------------------------------------------------------- large tensors (the two defects)


@pytest.mark.parametrize("path_name", ["native", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lsq_8m_elements_constant_gradient(path_name, dtype):
    if path_name == "native":
        native_kernels_or_skip()
    x = torch.relu(activations(BIG, dtype, seed=11))
    check_lsq(path_name, x, upstream(x, "constant", seed=0), 8)


def test_regression_step_gradient_without_cancellation():
    """The ATen path used to compute ∂L/∂s as g·(⟨dy, v̂⟩ − ⟨dx, v⟩)/s, a difference of two large
    float32 sums: 17% off on 8M activations at 8 bits with a constant upstream gradient. The
    reference's bound rejects that formula and accepts the one from the formula's own terms."""
    x = torch.relu(activations(BIG, torch.float32, seed=11))
    dy = upstream(x, "constant", seed=0)
    q = LSQActQuantizer(8)
    q.initialize(x)
    g = 1.0 / math.sqrt(x.numel() * q.q_p)
    _, _, ds_ref, bound = ref_lsq(x, q.step, dy, q.q_n, q.q_p, g)
    with torch.no_grad():  # the old formula, reproduced here to show that the bound can fail
        s = q.step.detach()
        y = torch.round(torch.clamp(x / s, 0, q.q_p)) * s
        dx = torch.where((x / s >= 0) & (x / s <= q.q_p), dy, 0.0)
        old = g * (torch.dot(dy.view(-1), y.view(-1)) - torch.dot(dx.view(-1), x.view(-1))) / s
    assert (old.double() - ds_ref).abs() > bound
    with native.disabled():
        _, _ = run("aten", q, x, dy)
    assert (q.step.grad.double() - ds_ref).abs() <= bound


@pytest.mark.parametrize("name", ["hwgq", "lsq"])
def test_regression_bf16_levels_from_a_float32_quotient(name):
    """bf16 on the ATen path used to round x/Δ to bf16 before rounding to a level, moving up to 12%
    of 8-bit activations to the neighbouring level. Now none move; the old way is shown to move some."""
    x = torch.relu(torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16).view(-1, 4, 16, 16)
    dy = upstream(x, "random", seed=1)
    if name == "hwgq":
        q = HWGQActQuantizer(8)
        step = torch.tensor(A_STEP[8])
        y_ref, _ = ref_hwgq(x, 8, True, dy)
    else:
        q = LSQActQuantizer(8)
        q.initialize(x.float())
        step = q.step.detach()
        y_ref, *_ = ref_lsq(x, q.step, dy, q.q_n, q.q_p, 1.0)
    old = torch.round(torch.clamp(torch.div(x, step.to(torch.bfloat16)), 0, 255))  # the quotient in bf16
    moved_before = (old.double() != quotient(x, step.double()).clamp(0, 255).round()).double().mean().item()
    assert moved_before > 0.01
    y, _ = run("aten", q, x, dy)
    assert torch.equal(y.double(), y_ref.double())
