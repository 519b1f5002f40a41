"""Fused CPU kernels for the per-tensor fake-quantizers, compiled on first use.

A fake-quantizer is bandwidth-bound; in eager ATen its forward is four or five elementwise passes
and LSQ's backward more plus a reduction. The kernels in ``kernels.c`` do each in one
OpenMP-parallel, vectorised pass: LSQ forward, LSQ backward (input gradient and step gradient
together) and HWGQ's activation forward. They are the CPU implementation behind the
``torch.library`` ops of :mod:`kdtoolkit.quant.ops` and compute the same numbers as the ATen
implementation there (quotient and level in float32, step gradient summed in float64).

Built by :mod:`kdtoolkit.quant.native.build` (private ``0o700`` cache, owner checks, a file lock so
that concurrent processes compile once) and loaded with :mod:`ctypes`; the library links
``libgomp.so.1``, the OpenMP runtime torch has loaded, so the kernels share torch's threads.

``KDTOOLKIT_NATIVE``: ``auto`` (default: build on first use, else fall back to ATen with one
warning), ``0`` (off), ``require`` (a failed build is an error, raised again at every use: the
process never silently runs on the fallback). :func:`status` reports without compiling;
:func:`prepare` builds now (a launcher may call it on local rank 0 before starting the workers).

Which tensors qualify (:func:`supports`): CPU, float32/float64/bfloat16, dense in a layout shared
by every tensor of the call (contiguous or channels-last), a per-tensor (0-dim) step.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings

import torch

from kdtoolkit.quant.native import build
from kdtoolkit.quant.native.build import NativeBuildError

ENV = "KDTOOLKIT_NATIVE"

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

__all__ = ["ENV", "NativeBuildError", "disabled", "library", "prepare", "status", "supports"]


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("require", "required"):
        return "require"
    return "auto"


class _Loader:
    """The process's one attempt to build and load the kernels, and its outcome."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tried = False
        self.lib: ctypes.CDLL | None = None
        self.reason = "not built yet"
        self.error: NativeBuildError | None = None  # kept: re-raised at every use under 'require'

    def get(self) -> ctypes.CDLL | None:
        if not self.tried:
            with self.lock:
                if not self.tried:
                    self._try()
                    self.tried = True
        if self.lib is None and _mode() == "require":
            raise self.error or NativeBuildError(f"kdtoolkit native kernels required ({ENV}=require): {self.reason}")
        return self.lib

    def _try(self) -> None:
        if _mode() == "off":
            self.reason = f"turned off by {ENV}={os.environ.get(ENV)}"
            return
        try:
            path, compiled = build.build()
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.kdq_version() != build.ABI_VERSION:
                raise NativeBuildError(f"{path} has ABI version {lib.kdq_version()}, expected {build.ABI_VERSION}")
        except Exception as exc:  # any failure means "use the ATen path", said once
            self.reason = f"{type(exc).__name__}: {exc}"
            self.error = NativeBuildError(f"kdtoolkit native kernels required ({ENV}=require): {self.reason}")
            if _mode() != "require":
                warnings.warn(
                    f"kdtoolkit: fused quantizer kernels unavailable ({self.reason}); "
                    f"using the ATen implementation (same numbers, slower on the CPU). Set {ENV}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        self.lib = lib
        self.reason = f"{'built' if compiled else 'loaded'} {path}"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in _SUFFIX.values():
        getattr(lib, f"kdq_lsq_fwd_{suffix}").argtypes = [p, p, i64, p, i32, f64, f64, i32]
        getattr(lib, f"kdq_lsq_bwd_{suffix}").argtypes = [p, p, p, i64, p, i32, f64, f64, f64, p, i32, i32]
        getattr(lib, f"kdq_hwgq_fwd_{suffix}").argtypes = [p, p, i64, f64, f64, f64, i32, i32]
        for kind in ("lsq_fwd", "lsq_bwd", "hwgq_fwd"):
            getattr(lib, f"kdq_{kind}_{suffix}").restype = None
    lib.kdq_version.restype = ctypes.c_int


_loader = _Loader()
_disabled = threading.local()


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on the first call; None where unavailable.

    Under ``KDTOOLKIT_NATIVE=require`` a failed build raises :class:`NativeBuildError`, every time.
    """
    return _loader.get()


def prepare() -> dict:
    """Build (or load) the kernels now and return :func:`status`: for launchers (build once on local
    rank 0 before the other ranks start) and for run records. Raises as :func:`library` does."""
    library()
    return status()


def status() -> dict:
    """``{"available", "tried", "reason", "mode"}`` of this process, without building anything."""
    return {"available": _loader.lib is not None, "tried": _loader.tried, "reason": _loader.reason, "mode": _mode()}


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


@contextlib.contextmanager
def disabled():
    """Within this block (on this thread) the quantizer ops use their ATen implementation."""
    before = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


def supports(x: torch.Tensor, *scalars: torch.Tensor) -> bool:
    """True when the kernels apply to ``x`` (and the 0-dim tensors ``scalars``) and are available."""
    if getattr(_disabled, "on", False):
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPE_CODES or not _dense(x):
        return False
    if any(s.dim() != 0 or s.device.type != "cpu" or s.dtype not in _DTYPE_CODES for s in scalars):
        return False
    return library() is not None


def _like(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` in ``x``'s dtype and memory layout (a no-op when it already is)."""
    if other.dtype == x.dtype and other.stride() == x.stride() and _dense(other):
        return other
    return torch.empty_like(x).copy_(other)


def lsq_forward(x: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """``round(clamp(x/step, -q_n, q_p))·step`` for a 0-dim ``step`` (see :func:`supports`)."""
    y = torch.empty_like(x)
    fn = getattr(_loader.lib, f"kdq_lsq_fwd_{_SUFFIX[x.dtype]}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), step.data_ptr(), _DTYPE_CODES[step.dtype], q_n, q_p, torch.get_num_threads())
    return y


def lsq_backward(
    x: torch.Tensor, dy: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ's ``(dx, d_step)`` in one pass; ``d_step`` is a 0-dim tensor of ``step``'s dtype."""
    dy = _like(x, dy)
    dx = torch.empty_like(x)
    d_step = torch.empty((), dtype=step.dtype)
    fn = getattr(_loader.lib, f"kdq_lsq_bwd_{_SUFFIX[x.dtype]}")
    fn(
        x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), step.data_ptr(), _DTYPE_CODES[step.dtype],
        q_n, q_p, grad_scale, d_step.data_ptr(), _DTYPE_CODES[step.dtype], torch.get_num_threads(),
    )
    return dx, d_step


def hwgq_forward(x: torch.Tensor, step: float, lo: int, levels: int, zero_nonpositive: bool) -> torch.Tensor:
    """``clamp(round(x/step), lo, levels)·step`` (float32 ``step``), and 0 where ``x <= 0`` if ``zero_nonpositive``."""
    y = torch.empty_like(x)
    fn = getattr(_loader.lib, f"kdq_hwgq_fwd_{_SUFFIX[x.dtype]}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), step, lo, levels, int(zero_nonpositive), torch.get_num_threads())
    return y
