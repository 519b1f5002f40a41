"""Compiling ``kernels.c`` into a private, per-user cache, once per key, safely on shared machines.

* The cache directory (``$KDTOOLKIT_CACHE_DIR/native``, else ``$XDG_CACHE_HOME/kdtoolkit/native``,
  else ``~/.cache/kdtoolkit/native``) is created with mode ``0o700`` and refused (:class:`NativeBuildError`)
  when it is a symlink, is owned by another user or is writable by group or others. A library
  found there is loaded only if it too is owned by this user and writable by nobody else. There is
  no fallback location: a refused or unwritable cache means "no native kernels" (the ATen path).
* The library's name is a key over the source, the flags, the compiler's version, the CPU and the
  ABI version. Concurrent processes (DDP ranks, parallel test workers) take an exclusive
  ``fcntl`` lock on ``<cache>/.lock`` before looking for the file, so exactly one of them compiles
  and the others load its result; the compiler writes to a private temporary name that is
  renamed into place atomically.
* gcc and clang are supported (``$CC``, else ``cc``); the kernels use GCC's OpenMP runtime
  (``libgomp``, the one torch's wheels load), which clang selects with ``-fopenmp=libgomp``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path

from kdtoolkit.errors import KDToolkitError

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-march=native", "-fno-math-errno")
ABI_VERSION = 2


class NativeBuildError(KDToolkitError, RuntimeError):
    """The kernels could not be compiled or loaded.

    A user error (exit 2 at the CLI's boundary): the machine's compiler, platform or cache directory
    is at fault, or ``KDTOOLKIT_NATIVE=require`` asked for kernels this machine cannot build.
    """


def cache_dir() -> Path:
    root = os.environ.get("KDTOOLKIT_CACHE_DIR")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdtoolkit" / "native"


def check_private(path: Path, *, directory: bool) -> None:
    """Refuse ``path`` unless it is a real file/directory owned by this user, writable by nobody else."""
    info = os.lstat(path)
    kind = "directory" if directory else "file"
    if stat.S_ISLNK(info.st_mode):
        raise NativeBuildError(f"refusing the kernel cache {kind} {path}: it is a symbolic link")
    if (directory and not stat.S_ISDIR(info.st_mode)) or (not directory and not stat.S_ISREG(info.st_mode)):
        raise NativeBuildError(f"refusing the kernel cache {kind} {path}: not a {kind}")
    if info.st_uid != os.getuid():
        raise NativeBuildError(f"refusing the kernel cache {kind} {path}: owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(
            f"refusing the kernel cache {kind} {path}: writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}; it must be private, e.g. chmod 700)"
        )


def private_dir(path: Path) -> Path:
    """``path`` created with mode 0o700 (parents with the default mode), and checked with :func:`check_private`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path, directory=True)
    return path


def compiler() -> str:
    return os.environ.get("CC", "cc")


def _compiler_version(cc: str) -> str:
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"no C compiler ({cc!r}: {exc})") from None
    if result.returncode != 0:
        raise NativeBuildError(f"no working C compiler ({cc!r} --version exited {result.returncode})")
    return result.stdout


def _openmp_flag(version: str) -> str:
    return "-fopenmp=libgomp" if "clang" in version.lower() else "-fopenmp"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def library_name(cc: str, version: str, source: bytes) -> str:
    flags = (*FLAGS, _openmp_flag(version))
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode(),
                    platform.machine().encode(), str(ABI_VERSION).encode()])
    ).hexdigest()[:20]
    return f"kdq-{key}.so"


def build(source: Path = SOURCE, directory: Path | None = None) -> tuple[Path, bool]:
    """The compiled library for this machine and compiler: ``(path, compiled_now)``.

    Compiles at most once per key across concurrent processes (an exclusive file lock); raises
    :class:`NativeBuildError` with the reason when no compiler works, the compiler fails or the
    cache is not private.
    """
    if platform.system() != "Linux":
        raise NativeBuildError(f"native kernels are built on Linux only (this is {platform.system()})")
    cc = compiler()
    version = _compiler_version(cc)
    text = source.read_bytes()
    directory = private_dir(directory if directory is not None else cache_dir())
    target = directory / library_name(cc, version, text)
    lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.lexists(target):
            check_private(target, directory=False)
            return target, False
        fd, tmp = tempfile.mkstemp(prefix=".kdq-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            flags = (*FLAGS, _openmp_flag(version))
            result = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise NativeBuildError(f"{cc} failed: {result.stderr.strip()[-2000:]}")
            os.chmod(tmp, 0o700)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target, True
    finally:
        os.close(lock_fd)  # releases the lock
