"""Fused CPU kernels for the per-tensor fake-quantizers, compiled on first use.

A fake-quantizer is bandwidth-bound; in eager PyTorch its forward is four or five elementwise
passes (``div, clamp_, round_, mul_``) and LSQ's backward three more plus two reductions. The
kernels in ``kernels.c`` do each in one OpenMP-parallel, vectorised pass: LSQ forward, LSQ
backward (input gradient and step gradient together) and HWGQ's activation forward.

The C file is compiled with the system C compiler (``$CC`` or ``cc``; about a second) the first
time a quantizer runs on the CPU, and cached in ``$KDTOOLKIT_CACHE_DIR/native`` (default
``~/.cache/kdtoolkit/native``) under a key of the source, the flags, the compiler and the CPU
(``-march=native``). It is loaded with :mod:`ctypes` and links ``libgomp.so.1``, the OpenMP runtime
torch itself has loaded, so the kernels share torch's threads (``torch.get_num_threads()``).

Where no compiler works (or on other platforms) the quantizers keep their ATen implementation,
which computes the same formulas; :func:`status` says which is in use and why, and one warning
is issued. ``KDTOOLKIT_NATIVE=0`` turns the kernels off; ``KDTOOLKIT_NATIVE=require`` makes a
failed build an error (CI uses it).

Which tensors qualify (:func:`supports`): CPU, float32/float64/bfloat16, dense in a layout shared
by every tensor of the call (contiguous or channels-last), outside ``torch.compile`` tracing.
Per-channel steps stay on ATen (weights are small).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-march=native", "-fno-math-errno")
ABI_VERSION = 1
ENV = "KDTOOLKIT_NATIVE"

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "reason": "not built yet", "path": None}
_disabled = threading.local()


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (raised only with ``KDTOOLKIT_NATIVE=require``)."""


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("require", "required"):
        return "require"
    return "auto"


def cache_dir() -> Path:
    root = os.environ.get("KDTOOLKIT_CACHE_DIR")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdtoolkit" / "native"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _build(target_dir: Path) -> Path:
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"no C compiler ({compiler!r}: {exc})") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_fingerprint().encode(),
                    platform.machine().encode(), str(ABI_VERSION).encode()])
    ).hexdigest()[:20]
    target = target_dir / f"kdq-{key}.so"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kdq-", suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise NativeBuildError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders (DDP ranks) each install a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in _SUFFIX.values():
        getattr(lib, f"kdq_lsq_fwd_{suffix}").argtypes = [p, p, i64, p, i32, f64, f64, i32]
        getattr(lib, f"kdq_lsq_bwd_{suffix}").argtypes = [p, p, p, i64, p, i32, f64, f64, f64, p, i32, i32]
        getattr(lib, f"kdq_hwgq_fwd_{suffix}").argtypes = [p, p, i64, f64, f64, f64, i32, i32]
        for kind in ("lsq_fwd", "lsq_bwd", "hwgq_fwd"):
            getattr(lib, f"kdq_{kind}_{suffix}").restype = None
    lib.kdq_version.restype = ctypes.c_int


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise NativeBuildError(f"native kernels are built on Linux only (this is {platform.system()})")
    try:
        path = _build(cache_dir())
    except PermissionError:
        path = _build(Path(tempfile.gettempdir()) / f"kdtoolkit-native-{os.getuid()}")
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.kdq_version() != ABI_VERSION:
        raise NativeBuildError(f"{path} has ABI version {lib.kdq_version()}, expected {ABI_VERSION}")
    _state["path"] = str(path)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on the first call; None where unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        mode = _mode()
        if mode == "off":
            _state["reason"] = f"turned off by {ENV}={os.environ.get(ENV)}"
        else:
            try:
                _state["lib"] = _load()
                _state["reason"] = f"loaded from {_state['path']}"
            except Exception as exc:  # any failure means "use the ATen path", said once
                _state["reason"] = f"{type(exc).__name__}: {exc}"
                if mode == "require":
                    _state["tried"] = True
                    raise NativeBuildError(f"kdtoolkit native kernels required ({ENV}=require): {_state['reason']}") from exc
                warnings.warn(
                    f"kdtoolkit: fused quantizer kernels unavailable ({_state['reason']}); "
                    f"using the slower ATen implementation. Set {ENV}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["tried"] = True
        return _state["lib"]


def status() -> dict:
    """``{"available": bool, "reason": str}`` (builds the kernels if not tried yet)."""
    try:
        lib = library()
    except NativeBuildError:
        lib = None
    return {"available": lib is not None, "reason": _state["reason"]}


def known_status() -> dict | None:
    """``status()`` if the kernels were tried in this process, else None: never builds them."""
    return status() if _state["tried"] else None


def _reset_for_tests() -> None:
    with _lock:
        _state.update(tried=False, lib=None, reason="not built yet", path=None)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


@contextlib.contextmanager
def disabled():
    """Within this block (on this thread) the quantizers use their ATen implementation."""
    before = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


def supports(x: torch.Tensor, *scalars: torch.Tensor) -> bool:
    """True when the kernels are available and apply to ``x`` (and the 0-dim tensors ``scalars``)."""
    if getattr(_disabled, "on", False):
        return False
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype not in _DTYPE_CODES or not _dense(x):
        return False
    if any(s.dim() != 0 or s.device.type != "cpu" or s.dtype not in _DTYPE_CODES for s in scalars):
        return False
    return library() is not None


def _like(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` in ``x``'s dtype and memory layout (a no-op when it already is)."""
    if other.dtype == x.dtype and other.stride() == x.stride() and _dense(other):
        return other
    return torch.empty_like(x).copy_(other)


def _threads() -> int:
    return torch.get_num_threads()


def lsq_forward(x: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """``round(clamp(x/step, -q_n, q_p))·step`` for a 0-dim ``step`` (see :func:`supports`)."""
    y = torch.empty_like(x)
    fn = getattr(_state["lib"], f"kdq_lsq_fwd_{_SUFFIX[x.dtype]}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), step.data_ptr(), _DTYPE_CODES[step.dtype], q_n, q_p, _threads())
    return y


def lsq_backward(
    x: torch.Tensor, dy: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, grad_scale: float,
    *, need_input_grad: bool = True, need_step_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LSQ's ``(dx, d_step)`` in one pass; ``d_step`` is a 0-dim tensor of ``step``'s dtype."""
    dy = _like(x, dy)
    dx = torch.empty_like(x) if need_input_grad else None
    d_step = torch.empty((), dtype=step.dtype) if need_step_grad else None
    fn = getattr(_state["lib"], f"kdq_lsq_bwd_{_SUFFIX[x.dtype]}")
    fn(
        x.data_ptr(), dy.data_ptr(), None if dx is None else dx.data_ptr(), x.numel(),
        step.data_ptr(), _DTYPE_CODES[step.dtype], q_n, q_p, grad_scale,
        None if d_step is None else d_step.data_ptr(), _DTYPE_CODES[step.dtype], _threads(),
    )
    return dx, d_step


def hwgq_forward(x: torch.Tensor, step: float, lo: int, levels: int, zero_nonpositive: bool) -> torch.Tensor:
    """``clamp(round(x/step), lo, levels)·step``, and 0 where ``x <= 0`` if ``zero_nonpositive``."""
    y = torch.empty_like(x)
    fn = getattr(_state["lib"], f"kdq_hwgq_fwd_{_SUFFIX[x.dtype]}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), step, lo, levels, int(zero_nonpositive), _threads())
    return y
