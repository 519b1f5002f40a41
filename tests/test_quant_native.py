"""The fused native quantizer kernels (kdtoolkit.quant.native) against the formulas written here with
torch ops, bit for bit where the arithmetic is the same; how they are chosen, built and refused.

The per-bit-width reference tests of LSQ and HWGQ (float64, every bit-width, values and gradients)
also run on these kernels: see the ``math_path`` fixtures of test_quant_lsq.py / test_quant_hwgq.py.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import native_kernels_or_skip

from kdtoolkit.quant import native
from kdtoolkit.quant.native import build
from kdtoolkit.quant.native.build import NativeBuildError
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


def run_python(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (fresh process state) with its kernel cache under ``cache``."""
    environ = {**os.environ, "KDTOOLKIT_CACHE_DIR": str(cache), "KDTOOLKIT_NATIVE": "auto", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=600)


def test_build_is_private_and_cached_by_key(tmp_path):
    directory = tmp_path / "native"
    path, compiled = build.build(directory=directory)
    assert compiled and path.parent == directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    mtime = path.stat().st_mtime_ns
    assert build.build(directory=directory) == (path, False)  # reused, not rebuilt
    assert path.stat().st_mtime_ns == mtime


def plant(directory: Path) -> Path:
    """A library at the name the build would load from ``directory`` (a copy of a real build)."""
    real, _ = build.build(directory=directory.parent / "private")
    directory.mkdir(mode=0o700, exist_ok=True)
    planted = directory / real.name
    shutil.copy(real, planted)
    return planted


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root; the group-writable cases still run")
def test_library_in_a_cache_owned_by_another_user_is_refused(tmp_path):
    planted = plant(tmp_path / "native")
    os.chown(planted.parent, 54321, 54321)
    with pytest.raises(NativeBuildError, match="owned by uid 54321"):
        build.build(directory=planted.parent)
    os.chown(planted.parent, os.getuid(), os.getgid())
    os.chown(planted, 54321, 54321)  # a private directory holding someone else's file
    with pytest.raises(NativeBuildError, match="owned by uid 54321"):
        build.build(directory=planted.parent)


@pytest.mark.parametrize("what", ["directory", "file"])
def test_group_or_world_writable_cache_is_refused(tmp_path, what):
    planted = plant(tmp_path / "native")
    os.chmod(planted.parent if what == "directory" else planted, 0o770 if what == "directory" else 0o666)
    with pytest.raises(NativeBuildError, match="writable by group or others"):
        build.build(directory=planted.parent)


def test_refused_cache_means_aten_with_one_message_and_no_fallback_location(tmp_path):
    """Through the process's loader: no other directory is tried, the quantizers still run (on ATen)."""
    planted = plant(tmp_path / "native")
    os.chmod(planted.parent, 0o777)
    result = run_python(
        """
        import warnings, torch
        from kdtoolkit.quant import native
        from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LSQActQuantizer(4)(torch.rand(2, 3, 4, 4)).sum()
            LSQActQuantizer(4)(torch.rand(2, 3, 4, 4)).sum()
        print(len(caught), native.status())
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 {'available': False") and "writable by group or others" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native", "private"]  # nothing built elsewhere


def test_two_processes_at_once_build_once(tmp_path):
    code = """
        from kdtoolkit.quant import native
        print(native.prepare()["reason"])
        """
    environ = {**os.environ, "KDTOOLKIT_CACHE_DIR": str(tmp_path), "KDTOOLKIT_NATIVE": "require"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    reasons = sorted(out.strip().split()[0] for out, _ in outputs)
    assert reasons == ["built", "loaded"]
    assert len(list((tmp_path / "native").glob("kdq-*.so"))) == 1


def test_require_stays_failed_after_status(tmp_path):
    result = run_python(
        """
        import torch
        from kdtoolkit.quant import native
        from kdtoolkit_plugins.quantizers.lsq import LSQActQuantizer
        for attempt in range(2):
            try:
                native.library()
                print("no error")
            except native.NativeBuildError as exc:
                print("raised:", "required" in str(exc), "no C compiler" in str(exc))
            print(native.status()["available"])
        try:
            LSQActQuantizer(4)(torch.rand(2, 3, 4, 4))
            print("quantizer ran")
        except native.NativeBuildError:
            print("quantizer raised")
        """,
        tmp_path, KDTOOLKIT_NATIVE="require", CC=str(tmp_path / "no-such-cc"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:5] == ["raised: True True", "False", "raised: True True", "False", "quantizer raised"]


def test_status_reports_without_compiling(tmp_path):
    result = run_python(
        """
        import kdtoolkit.plugins, kdtoolkit_plugins.quantizers.lsq, kdtoolkit_plugins.quantizers.hwgq
        from kdtoolkit.quant import native
        print(native.status())
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "'tried': False" in result.stdout and "not built yet" in result.stdout
    assert not (tmp_path / "native").exists()


def test_no_compiler_or_other_platform_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDTOOLKIT_NATIVE", raising=False)  # the default mode (CI runs with require)
    for setting, message in (("CC", "no C compiler"), ("platform", "built on Linux only")):
        if setting == "CC":
            monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        else:
            monkeypatch.delenv("CC")
            monkeypatch.setattr(build.platform, "system", lambda: "Darwin")
        loader = native._Loader()  # a fresh process's loader
        with pytest.warns(RuntimeWarning, match=message):
            assert loader.get() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert loader.get() is None  # said once
        assert message in loader.reason
    assert not (tmp_path / "native").exists()


def test_a_compiler_error_is_reported(tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    with pytest.raises(NativeBuildError, match="failed"):
        build.build(source=bad, directory=tmp_path / "native")


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_gcc_and_clang_build_kernels_with_the_same_numbers(compiler, tmp_path):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    result = run_python(
        """
        import torch
        from kdtoolkit.quant import native, ops
        torch.manual_seed(0)
        x = torch.randn(1 << 16) * 2
        step = torch.tensor(0.37)
        dy = torch.randn_like(x)
        y = ops.lsq_forward(x, step, 0, 15, 0.01)
        dx, ds = ops.lsq_backward(dy, x, step, 0, 15, 0.01)
        with native.disabled():
            y_ref = ops.lsq_forward(x, step, 0, 15, 0.01)
            dx_ref, ds_ref = ops.lsq_backward(dy, x, step, 0, 15, 0.01)
        # the step gradient's stated bound: relative to g * sum |dy * d(v_hat)/ds| (random dy cancels in the sum)
        v = x.double() / 0.37
        local = torch.where(v < 0, 0.0, torch.where(v > 15, 15.0, torch.round(v) - v))
        bound = 2.0 ** -20 * 0.01 * (dy.double() * local).abs().sum().item()
        print(native.status()["reason"].split()[0], torch.equal(y, y_ref), torch.equal(dx, dx_ref),
              abs(ds.item() - ds_ref.item()) <= bound)
        """,
        tmp_path, CC=compiler, KDTOOLKIT_NATIVE="require",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["built", "True", "True", "True"]


def test_require_without_kernels_is_one_line_exit_2_at_the_cli(tmp_path, cifar10_root):
    """``KDTOOLKIT_NATIVE=require`` on a machine that cannot build: the user's setting, so the
    boundary's one line and exit 2 (not a bug's exit 1), naming the setting and the reason."""
    from conftest import tiny_pipeline

    toml = tiny_pipeline(cifar10_root, tmp_path / "run", epochs=1).replace(
        "width = 1\n", 'width = 1\nquantizer = { name = "lsq", weight_bits = 2, act_bits = 2 }\n', 1)
    (tmp_path / "p.toml").write_text(toml)
    environ = {**os.environ, "KDTOOLKIT_CACHE_DIR": str(tmp_path / "cache"), "KDTOOLKIT_NATIVE": "require",
               "CC": str(tmp_path / "no-such-cc")}
    r = subprocess.run([sys.executable, "-m", "kdtoolkit", "run", str(tmp_path / "p.toml")], env=environ,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "KDTOOLKIT_NATIVE=require" in errors[0] and "no C compiler" in errors[0], r.stderr
