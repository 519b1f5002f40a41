"""The fused native quantizer kernels (kdtoolkit.quant.native) against the formulas written here with
torch ops, bit for bit where the arithmetic is the same; how they are chosen, built and refused.

The per-bit-width reference tests of LSQ and HWGQ (float64, every bit-width, values and gradients)
also run on these kernels: see the ``math_path`` fixtures of test_quant_lsq.py / test_quant_hwgq.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import native_kernels_or_skip

from kdtoolkit.quant import native
from kdtoolkit_plugins.quantizers.hwgq import A_STEP, HWGQActQuantizer, HWGQQuantizer
from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer, LSQQuantizer


@pytest.fixture(autouse=True)
def kernels():
    native_kernels_or_skip()
    return native


def special_input(n: int, scale: float, dtype) -> torch.Tensor:
    """Random values over and beyond a range, with exact grid points, zeros, infinities and NaN."""
    x = (torch.rand(n, dtype=torch.float64) * 3.2 - 1.6) * scale
    x[:8] = torch.tensor([0.0, -0.0, scale, -scale, math.inf, -math.inf, math.nan, scale / 2])
    return x.to(dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, any NaN matching any NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(bits_of(a)[~nan], bits_of(b)[~nan])


def lsq_reference(x, s, dy, q_n, q_p, grad_scale):
    """LSQ written from the formula in float32 (float64 for float64 inputs), output rounded once."""
    c = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = x.to(c) / s.to(c)
    y = (torch.round(torch.clamp(t, -q_n, q_p)) * s.to(c)).to(x.dtype)
    inside = (t >= -q_n) & (t <= q_p)
    dx = torch.where(inside, dy, torch.zeros_like(dy))
    local = torch.where(inside, torch.round(t) - t, torch.where(t < -q_n, float(-q_n), float(q_p)))
    terms = dy.double() * local.double()
    # the kernel forms products and partial sums in the compute dtype: compare within its rounding
    # error relative to the sum of |terms| (a float32 sum of n terms is exact only to ~eps·Σ|term|)
    tolerance = (1e-12 if c == torch.float64 else 2e-6) * terms.abs().sum() * grad_scale
    return y, dx, terms.sum() * grad_scale, tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1000, 300_000])  # below and above the size that goes multi-threaded
@pytest.mark.parametrize("q_n,q_p", [(0, 3), (0, 255), (2, 1), (128, 127)])
def test_lsq_kernels_match_the_formula_bit_for_bit(dtype, n, q_n, q_p):
    step = torch.tensor(0.05 + torch.rand(()).item(), dtype=torch.float32)
    x = special_input(n, step.item() * max(q_p, q_n), dtype)
    dy = torch.randn(n, dtype=torch.float64).to(dtype)
    grad_scale = 1.0 / math.sqrt(n * q_p)
    ref_y, ref_dx, ref_ds, tolerance = lsq_reference(x, step, dy, q_n, q_p, grad_scale)
    assert native.supports(x, step)
    y = native.lsq_forward(x, step, q_n, q_p)
    assert y.dtype == dtype and same_bits(y, ref_y)
    dx, d_step = native.lsq_backward(x, dy, step, q_n, q_p, grad_scale)
    assert same_bits(dx, ref_dx)
    assert d_step.dtype == step.dtype
    torch.testing.assert_close(d_step.double(), ref_ds, rtol=1e-6, atol=tolerance.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("caffe", [True, False])
def test_hwgq_forward_kernel_matches_the_formula_bit_for_bit(dtype, bits, caffe):
    delta, levels = A_STEP[bits], 2**bits - 1
    x = special_input(50_000, delta * levels, dtype)
    c = torch.float64 if dtype == torch.float64 else torch.float32
    k = torch.clamp(torch.round(x.to(c) / delta), 1 if caffe else 0, levels)
    ref = k * delta
    if caffe:
        ref = torch.where(x.to(c) <= 0, torch.zeros_like(ref), ref)
    y = native.hwgq_forward(x, delta, 1 if caffe else 0, levels, caffe)
    assert same_bits(y, ref.to(dtype))


def test_step_gradient_is_deterministic_and_written_in_the_steps_dtype():
    x = torch.randn(64, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    for step_dtype in (torch.float32, torch.float64, torch.bfloat16):
        step = torch.tensor(0.25, dtype=step_dtype)
        grads = [native.lsq_backward(x, dy, step, 0, 3, 1e-3)[1] for _ in range(3)]
        assert all(g.dtype == step_dtype for g in grads)
        assert all(torch.equal(g, grads[0]) for g in grads)


def test_layouts_mixed_and_non_dense_inputs():
    step = torch.tensor(0.3)
    x = torch.randn(8, 6, 5, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)  # contiguous, while x_cl is channels-last
    ref_y, ref_dx, ref_ds, tolerance = lsq_reference(x, step, dy, 0, 3, 0.01)
    y = native.lsq_forward(x_cl, step, 0, 3)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, ref_y)
    dx, ds = native.lsq_backward(x_cl, dy, step, 0, 3, 0.01)
    assert dx.is_contiguous(memory_format=torch.channels_last) and torch.equal(dx, ref_dx)
    torch.testing.assert_close(ds.double(), ref_ds, rtol=1e-6, atol=tolerance.item())
    # a strided view is not dense: the quantizer falls back to ATen, with the same result
    wide = torch.randn(8, 12, 5, 7)
    view = wide[:, ::2]
    assert not native.supports(view, step)
    q = LSQActQuantizer(2)
    q.initialize(torch.ones(1))
    with torch.no_grad():
        q.step.fill_(0.3)
    assert torch.equal(q(view), q(view.contiguous()))
    assert not native.supports(torch.randn(3, dtype=torch.float16))
    assert not native.supports(x, torch.ones(4))  # per-channel steps stay on ATen


@pytest.mark.parametrize("name", ["lsq", "hwgq"])
def test_quantized_model_uses_the_kernels_under_bf16_autocast(name, monkeypatch):
    from kdtoolkit.quant import quantize_model

    calls = {"lsq_forward": 0, "lsq_backward": 0, "hwgq_forward": 0}
    for fn in calls:
        original = getattr(native, fn)

        def counted(*args, _original=original, _fn=fn, **kwargs):
            calls[_fn] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(native, fn, counted)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5),
    )
    quantizer = LSQQuantizer() if name == "lsq" else HWGQQuantizer()
    quantize_model(model, quantizer, weight_bits=2, act_bits=2)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    if name == "lsq":  # two quantized convs: activation and weight quantizers, forward and backward
        assert calls["lsq_forward"] == 4 and calls["lsq_backward"] == 4
    else:
        assert calls["hwgq_forward"] == 2
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    monkeypatch.setenv("KDTOOLKIT_CACHE_DIR", str(tmp_path))
    native._reset_for_tests()
    yield tmp_path
    native._reset_for_tests()


def test_build_is_cached_by_key(fresh_build_state, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_NATIVE", "auto")
    assert native.library() is not None
    (built,) = (fresh_build_state / "native").glob("kdq-*.so")
    mtime = built.stat().st_mtime_ns
    native._reset_for_tests()
    assert native.library() is not None and native.status()["reason"] == f"loaded from {built}"
    assert built.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_no_compiler_falls_back_with_one_warning(fresh_build_state, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_NATIVE", "auto")
    monkeypatch.setenv("CC", str(fresh_build_state / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="fused quantizer kernels unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # said once
        x = torch.rand(2, 3, 4, 4)
        assert not native.supports(x)
        q = HWGQActQuantizer(2)
        torch.testing.assert_close(q(x), torch.clamp(torch.round(x / A_STEP[2]), 1, 3) * A_STEP[2])
    assert not native.status()["available"] and "no C compiler" in native.status()["reason"]


def test_turned_off_and_required(fresh_build_state, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_NATIVE", "0")
    assert native.library() is None and "turned off" in native.status()["reason"]
    native._reset_for_tests()
    monkeypatch.setenv("KDTOOLKIT_NATIVE", "require")
    monkeypatch.setenv("CC", str(fresh_build_state / "no-such-cc"))
    with pytest.raises(native.NativeBuildError, match="required"):
        native.library()
    native._reset_for_tests()
    monkeypatch.setenv("CC", "cc")
    bad = fresh_build_state / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.library()
