"""A fused CPU kernel for the 8-bit AdamW update, compiled once with the system C compiler and called by ctypes.

Why not torch ops: the update is ~20 elementwise passes plus four table lookups per value; as separate torch
ops it runs ~40x slower than torch's fused AdamW on CPU, and torch.compile's generated C++ (indirect loads,
a recomputed reduction) was still ~9x slower here. One pass over each 256-value block, with m and v kept in
a stack buffer between the update and the requantisation, is memory-bound like the fused fp32 kernel.

The C source has no dependencies (no Python or torch headers), so it builds in well under a second; the
shared object is cached under `$MEMFIT_CACHE` (default `~/.cache/memfit`), keyed by the source, the compiler
flags and the CPU. Loading a shared object runs its code, so the cache is trusted only as far as it is ours: the
directory must be owned by this user and writable by nobody else (it is created 0700; one that is not private
is not used, and the kernel is built in a fresh private temporary directory instead), and every build records
the SHA-256 of its .so beside it, checked before each load (a mismatch or a missing record rebuilds). Without
a working compiler, `load()` returns None and the optimizer falls back to chunked torch ops (same maths, slower).
`-ffp-contract=off` keeps the rounding of the torch fallback (no FMA).
Threads: ctypes releases the GIL, so a small thread pool splits the blocks across `torch.get_num_threads()`.
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
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from memfit.optim.quant import BLOCK, QuantTables

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline uint8_t quant(float x, const uint8_t* lut, const float* mids) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    uint8_t j = lut[bits >> 16];
    return (uint8_t)(j + (x > mids[j]));
}

/* Blocks [b0, b1) of a tensor of rows of `row` values (a flat tensor is one row); a block never crosses a row.
   hp: 1-beta1, beta2, 1-beta2, 1-lr*wd, -lr/bc1, sqrt(bc2), eps.
   Three loops per block so the middle one (the arithmetic) vectorises; the table lookups stay scalar. */
void adamw8bit_blocks(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                      uint8_t* restrict vq, float* restrict va, int64_t row, int64_t b0, int64_t b1,
                      const float* restrict mmap, const uint8_t* restrict mlut, const float* restrict mmids,
                      const float* restrict vmap, const uint8_t* restrict vlut, const float* restrict vmids,
                      const float* restrict hp) {
    const float w1 = hp[0], beta2 = hp[1], w2 = hp[2], decay = hp[3], neg_step = hp[4], bc2s = hp[5], eps = hp[6];
    const int64_t per_row = (row + BLOCK - 1) / BLOCK;
    float m[BLOCK], v[BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t r = b / per_row, col = (b - r * per_row) * BLOCK, s = r * row + col;
        const int len = (row - col < BLOCK) ? (int)(row - col) : BLOCK;
        const float am = ma[b], av = va[b];
        for (int k = 0; k < len; k++) {
            m[k] = mmap[mq[s + k]] * am;
            v[k] = vmap[vq[s + k]] * av;
        }
        uint32_t mmax_bits = 0, vmax_bits = 0;  /* max over the bits of non-negative floats: vectorises */
        float* restrict pb = p + s;
        const float* restrict gb = g + s;
        for (int k = 0; k < len; k++) {
            const float gi = gb[k];
            const float mi = m[k] + w1 * (gi - m[k]);
            const float vi = v[k] * beta2 + w2 * gi * gi;
            const float denom = sqrtf(vi) / bc2s + eps;
            pb[k] = pb[k] * decay + neg_step * (mi / denom);
            m[k] = mi;
            v[k] = vi;
            uint32_t mb, vb;
            memcpy(&mb, &mi, 4);
            memcpy(&vb, &vi, 4);
            mb &= 0x7FFFFFFFu;
            mmax_bits = mb > mmax_bits ? mb : mmax_bits;
            vmax_bits = vb > vmax_bits ? vb : vmax_bits;
        }
        float mmax, vmax;
        memcpy(&mmax, &mmax_bits, 4);
        memcpy(&vmax, &vmax_bits, 4);
        const float im = mmax > 0.0f ? 1.0f / mmax : 0.0f, iv = vmax > 0.0f ? 1.0f / vmax : 0.0f;
        /* One state per loop: ~10% faster than both in one (fewer live registers, one table at a time). */
        for (int k = 0; k < len; k++) mq[s + k] = quant(m[k] * im, mlut, mmids);
        for (int k = 0; k < len; k++) vq[s + k] = quant(v[k] * iv, vlut, vmids);
        ma[b] = mmax;
        va[b] = vmax;
    }
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", f"-DBLOCK={BLOCK}"]
MIN_PARALLEL_BLOCKS = 256  # below ~64K values one thread is faster than a hand-off


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
                  "symlink); building the 8-bit AdamW kernel in a temporary directory instead. To cache the build, "
                  "remove it (it is recreated 0700): a chmod would keep whatever others may have put in it.",
                  RuntimeWarning, stacklevel=3)
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


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"adamw8bit-{key}.so"
    record = target.with_name(target.name + ".sha256")
    if target.is_file() and record.is_file() and record.read_text().strip() == _sha256(target):
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "adamw8bit.c"
        src.write_text(SOURCE)
        out = Path(tmp) / "kernel.so"
        cmd = [compiler, *FLAGS, str(src), "-o", str(out), "-lm"]
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


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when no C compiler works here."""
    if os.environ.get("MEMFIT_NO_KERNEL"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"memfit: 8-bit AdamW CPU kernel unavailable ({e}); using slower torch ops. "
                      "Install gcc or set CC to speed it up.", RuntimeWarning, stacklevel=2)
        return None
    fn = lib.adamw8bit_blocks
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 7
    return lib


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="memfit-adamw8bit")


def adamw8bit_step(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ma: torch.Tensor, vq: torch.Tensor,
                   va: torch.Tensor, hp: torch.Tensor, tm: QuantTables, tv: QuantTables, row: int) -> None:
    """Update flat contiguous CPU tensors in place: p, g fp32 [n]; mq, vq uint8 [n]; ma, va fp32 [nb]; hp fp32 [7].
    Blocks run along rows of `row` values (`row` = n for one flat run of blocks)."""
    fn = load().adamw8bit_blocks
    ptrs = [t.data_ptr() for t in (p, g, mq, ma, vq, va)]
    tables = [t.data_ptr() for t in (tm.qmap, tm.lut, tm.mids, tv.qmap, tv.lut, tv.mids, hp)]
    nb = ma.numel()
    threads = min(torch.get_num_threads(), max(1, nb // MIN_PARALLEL_BLOCKS))
    if threads == 1:
        fn(*ptrs, row, 0, nb, *tables)
        return
    bounds = [nb * i // threads for i in range(threads + 1)]
    pool = _pool(threads)
    futures = [pool.submit(fn, *ptrs, row, lo, hi, *tables) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    for f in futures:
        f.result()
