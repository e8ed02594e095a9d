"""Memory probes: this process's resident set (RSS, page cache excluded) and the accelerator's allocator.

RSS is what the kernel charges this process for; the page cache holding a checkpoint we read is not in it,
which is why streamed reads drop their pages (see st_reader) instead of calling them "saved memory".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterable
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors` (tied weights and views count once; fake ones too)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def rss_bytes() -> int:
    """Current resident set size (Linux; 0 elsewhere)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since start or the last `reset_peak_rss()`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark of this process (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak memory where compute happens: the CUDA allocator's peak on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LEAN_THRESHOLD = 256 * 1024


def lean_allocator(threshold: int = LEAN_THRESHOLD) -> bool:
    """Make glibc map every allocation above `threshold` bytes and unmap it when freed (True where it applies).

    By default glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), so a training
    step's activations land in the heap, and the holes freed tensors leave there stay resident: measured peaks were
    3-41% above the live bytes (bench/plan.py). A fixed threshold keeps the resident set at the live bytes, which
    `memfit plan` predicts, at the cost of a page fault per 4 KB of every large allocation (updates 1.3-1.6x slower in
    bench/plan.py).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None off glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the OS: after a phase that churned through the heap (a streamed
    layer's recompute, quantizing a model as it loads), whose freed pages otherwise stay resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files whose name ends with `suffix` ([] off Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def release_checkpoint_map(model: torch.nn.Module) -> int:
    """Copy out of a checkpoint's memory map the tensors that still view it, when the model no longer uses all of
    it; returns the bytes copied. from_pretrained's tensors view the mapped safetensors file, and while one does,
    every page read from it stays mapped and resident, those of weights converted since (experts fused on load,
    weights quantized) included: 405 MB of SmolLM2's 538 MB file beside its 168 MB NF4 model. A model that uses
    the whole file in place (a plain fp32 load) is left alone: copying it would only double the load's peak."""
    ranges = _file_mappings(".safetensors")
    if not ranges:
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    mapped = [t for t in tensors if t.device.type == "cpu" and t.numel()
              and any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]
    size = storage_bytes(mapped)
    if size >= 0.9 * sum(b - a for a, b in ranges):
        return 0
    for t in mapped:
        t.data = t.data.clone()
    trim_heap()
    return size

