"""Small C kernels, compiled once with the system C compiler and loaded by ctypes (the 8-bit AdamW update, the
block dequantization of quantized weights).

The sources have no dependencies (no Python or torch headers), so each builds in well under a second; the shared
object is cached under `$MEMFIT_CACHE` (default `~/.cache/memfit`), keyed by the source, the compiler flags and
the CPU. Loading a shared object runs its code, so the cache is trusted only as far as it is ours: the directory
must be owned by this user and writable by nobody else (it is created 0700; one that is not private is not used,
and the kernel is built in a fresh private temporary directory instead), and every build records the SHA-256 of
its .so beside it, checked before each load (a mismatch or a missing record rebuilds).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

# -ffp-contract=off keeps the rounding of the torch fallbacks (no FMA).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit")) / "kernels"


def _private(path: Path) -> bool:
    """Whether `path` is a real directory (no symlink) owned by this user that no one else can write."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _kernel_dir() -> Path:
    """The kernel cache, created private (0700); a fresh private temporary directory if it is not ours alone.
    A cache that was open to others is bypassed, not chmod-ed: what they put there meanwhile would stay."""
    root = _cache_dir()
    with contextlib.suppress(OSError):  # an unwritable location is handled like a foreign one, below
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _private(root):
        return root
    warnings.warn(f"memfit: the kernel cache {root} is not a private directory of this user (owner, mode or "
                  "symlink); building the CPU kernels in a temporary directory instead. To cache the build, "
                  "remove it (it is recreated 0700): a chmod would keep whatever others may have put in it.",
                  RuntimeWarning, stacklevel=4)
    tmp = tempfile.mkdtemp(prefix="memfit-kernels-")  # created 0700, by this user
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # one build per process: don't leave it behind
    return Path(tmp)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith("flags")), "") + platform.processor()
    except OSError:
        return platform.processor()


def _build(name: str, source: str, compiler: str, flags: list[str]) -> Path:
    key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"{name}-{key}.so"
    record = target.with_name(target.name + ".sha256")
    if target.is_file() and record.is_file() and record.read_text().strip() == _sha256(target):
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / "kernel.so"
        cmd = [compiler, *flags, str(src), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        digest = _sha256(out)
        (Path(tmp) / "kernel.sha256").write_text(digest + "\n")
        # atomic, so concurrent builders race harmlessly; the record goes last, so a crash between the two
        # renames leaves a .so without a matching record, which the next load rebuilds
        os.replace(out, target)
        os.replace(Path(tmp) / "kernel.sha256", record)
    if _sha256(target) != digest:  # replaced by someone else between our rename and now
        raise OSError(f"the kernel {target} changed right after it was built; refusing to load it")
    return target


def compile_library(name: str, source: str, flags: list[str], what: str, warn: bool = True) -> ctypes.CDLL | None:
    """The compiled `source`, or None (with one warning naming `what` falls back, unless `warn` is False: the
    caller has another build to try) when no C compiler works here or `MEMFIT_NO_KERNEL` is set."""
    if os.environ.get("MEMFIT_NO_KERNEL"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        return ctypes.CDLL(str(_build(name, source, compiler, FLAGS + flags)))
    except (OSError, subprocess.SubprocessError) as e:
        if warn:
            warnings.warn(f"memfit: the {name} CPU kernel is unavailable ({e}); {what} uses slower torch ops. "
                          "Install gcc or set CC to speed it up.", RuntimeWarning, stacklevel=3)
        return None
