"""Read single tensors of a safetensors checkpoint by key, with positional reads and no mmap.

Why not `safe_open`: it maps the file, and every page a read touches stays in this process's RSS
(as RssFile) until the map is closed; `posix_fadvise(DONTNEED)` cannot drop mapped pages. Reading
with `preadv` into memory we allocate, then dropping the page cache for that range, makes RSS and
the page cache reflect what is really held, and makes "bytes read" the bytes that came from disk.

Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets are relative to the first data byte. Sharded checkpoints add `model.safetensors.index.json`
with a `weight_map` from key to file name.

`direct=True` reads with O_DIRECT where the file system allows it: the disk's DMA fills a page-aligned
staging buffer, with no copy out of the page cache and nothing left in it. For reads of a few MB (MoE
experts) that is both faster and far cheaper in CPU than buffered reads followed by DONTNEED (measured
here, 1.6 MB reads of a cold file: 0.87 vs 0.60 GB/s, 0.06 vs 0.94 s of CPU per 640 MB); for long
sequential reads (streamed layers) the kernel's readahead makes buffered reads faster, so it is opt-in.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from memfit.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the spec caps the header at 100 MB
_ALIGN = 64  # byte alignment of each tensor inside a multi-tensor buffer
_DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address aligned to the logical block (<= 4 KiB)
_DIRECT_CHUNK = 1 << 20  # per-thread staging for direct reads: bounded RSS; 1-2 MB requests run at full speed


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset and length, dtype and shape."""

    key: str
    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one file, each header entry checked against the file first: a damaged or crafted header
    must not send a read outside the file, give a tensor the wrong number of bytes or alias two tensors."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header). Re-save or re-copy it.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} has a header of {n} bytes in a {size}-byte file: corrupt or truncated.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}). Re-save or re-copy it.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object; "
                              "the file is corrupt. Re-save or re-copy it.")
    infos = {key: _tensor_info(path, key, entry, 8 + n, size)
             for key, entry in header.items() if key != "__metadata__"}
    spans = sorted((i for i in infos.values() if i.nbytes), key=lambda i: (i.offset, i.nbytes))
    # Sorted by start, any overlap shows between neighbours: whatever starts inside a tensor follows it directly.
    for a, b in zip(spans, spans[1:], strict=False):
        if b.offset < a.offset + a.nbytes:
            raise CheckpointError(f"{path}: tensor {b.key!r} (file bytes {b.offset}-{b.offset + b.nbytes}) overlaps "
                                  f"tensor {a.key!r} (file bytes {a.offset}-{a.offset + a.nbytes}); the file is "
                                  "corrupt. Re-save or re-copy it.")
    return infos


def _tensor_info(path: Path, key: str, entry: object, start: int, size: int) -> TensorInfo:
    """One header entry as a TensorInfo, or a CheckpointError saying which field is wrong (never a bare
    KeyError or TypeError: the header is untrusted input)."""

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key!r} {what}; the file is corrupt or truncated. "
                               "Re-save or re-copy it.")

    if not isinstance(entry, dict):
        raise corrupt(f"has a header entry that is a JSON {type(entry).__name__}, not an object")
    name = entry.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {_short(name)}; memfit reads "
                              f"{sorted(DTYPES)}. The file is corrupt or in another dtype: re-save it in one of these.")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise corrupt(f"has data_offsets {_short(offsets)}, not a list of two integers [begin, end]")
    begin, end = offsets
    if begin < 0:
        raise corrupt(f"has data_offsets [{begin}, {end}]: begin is negative")
    if end < begin:
        raise corrupt(f"has data_offsets [{begin}, {end}]: end is before begin")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise corrupt(f"has shape {_short(shape)}, not a list of non-negative integers")
    if start + end > size:
        raise corrupt(f"lies outside the file (its data ends at byte {start + end} of a {size}-byte file)")
    nbytes, need = end - begin, math.prod(shape) * dtype.itemsize
    if nbytes != need:
        raise corrupt(f"has {nbytes} bytes of data, but shape {shape} of {name} takes {need}")
    return TensorInfo(key, path, start + begin, nbytes, dtype, tuple(shape))


def _short(value: object, limit: int = 200) -> str:
    """repr of a header value, cut short: a crafted header must not turn an error into pages of text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shard_path(root: Path, name: object) -> Path:
    """root / name, for a shard name read from root's index, refused unless it names a file inside root: a crafted
    index must not make the reader open, and feed into the model, any other file the process can read.

    Hugging Face's hub cache keeps a snapshot's files as links into the repository's blobs/ folder
    (snapshots/<rev>/x -> ../../blobs/<hash>); targets there count as inside, so cached models still load.
    """
    index = root / INDEX_NAME

    def refused(why: str) -> CheckpointError:
        return CheckpointError(f"{index} names shard {_short(name)}, which {why}; an index may only name files "
                               f"inside {root}. The index is corrupt or crafted: re-save or re-copy the checkpoint.")

    if not isinstance(name, str):
        raise refused(f"is a JSON {type(name).__name__}, not a string")
    rel = Path(name)
    if "\x00" in name or not rel.parts:
        raise refused("is empty or holds a NUL byte")
    if rel.is_absolute():
        raise refused("is an absolute path")
    if ".." in rel.parts:
        raise refused("has a '..' component")
    real_root = root.resolve()
    inside = [real_root]
    if real_root.parent.name == "snapshots":
        inside.append(real_root.parent.parent / "blobs")
    target = (root / rel).resolve()
    if not any(target.is_relative_to(r) for r in inside):
        raise refused(f"resolves (through a symlink) to {target}, outside the model directory")
    return root / rel


# torch's elementwise kernels run an OpenMP team only above this many elements (at::internal::GRAIN_SIZE).
_SERIAL_CHUNK = 32768


def serial_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) (1-D, converting dtypes) without an OpenMP team, for reader threads beside the compute.

    A torch copy of megabytes in a second thread starts an OpenMP team there, and once a process holds more
    OpenMP threads than cores, libgomp stops spinning between parallel regions in every team: each small op
    of the compute thread then pays a futex wake (measured: a fine-tune step through fully cached offloaded
    experts 1.7x slower with prefetch threads than without, 0.80 vs 0.46 s). Chunks below torch's grain size
    run inline in the calling thread; a copy without conversion is one numpy memcpy.
    """
    if dst.dtype == src.dtype:
        dst.view(torch.uint8).numpy()[:] = src.view(torch.uint8).numpy()
        return
    for start in range(0, dst.numel(), _SERIAL_CHUNK):
        dst[start: start + _SERIAL_CHUNK].copy_(src[start: start + _SERIAL_CHUNK])


def read_index(root: Path) -> dict[str, Path]:
    """key -> shard file, from root's model.safetensors.index.json, every shard name checked by `shard_path`."""
    index = root / INDEX_NAME
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{index} is not a valid index ({e}). Re-save the checkpoint.") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        what = "missing" if weight_map is None else f"a JSON {type(weight_map).__name__}"
        raise CheckpointError(f"{index} is not a valid index: its weight_map is {what}, not an object from tensor "
                              "names to shard file names. Re-save the checkpoint.")
    checked: dict[str, Path] = {}  # a shard holds many tensors: resolve each name once
    out = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or name not in checked:
            checked[name] = shard_path(root, name)  # raises for a name that is not a string
        out[key] = checked[name]
    return out


def checkpoint_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a directory with an index, or a directory of shards."""
    root = Path(checkpoint)
    if root.is_file():
        return [root]
    if (root / INDEX_NAME).is_file():
        files = sorted(set(read_index(root).values()))
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"the index in {root} names missing shards {missing}. Copy the whole checkpoint.")
        return files
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        raise CheckpointError(
            f"no safetensors checkpoint at {root}: expected a .safetensors file, or a directory with "
            f"{INDEX_NAME} or *.safetensors files. Save the model with save_pretrained(safe_serialization=True)."
        )
    return files


class SafetensorsReader:
    """Thread-safe reader of single tensors by key; counts the bytes it reads.

    drop_cache: after each read, advise the kernel to drop that range from the page cache, so a
        streamed model does not silently live on in the page cache and the next read really hits disk.
    pool: how many `read_many` buffers to keep for reuse once free (they stay in RSS while kept).
    direct: read with O_DIRECT (bypassing the page cache) where the file system supports it.
    """

    def __init__(self, checkpoint: str | os.PathLike, drop_cache: bool = True, pool: int = 0,
                 direct: bool = False) -> None:
        self.index: dict[str, TensorInfo] = {}
        for path in checkpoint_files(checkpoint):
            for key, info in _read_header(path).items():
                if key in self.index:
                    raise CheckpointError(f"tensor {key!r} appears in both {self.index[key].path} and {path}.")
                self.index[key] = info
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        self.bytes_read = 0
        self._lock = threading.Lock()
        self.pool, self._pool = pool, []
        self._fds = {p: os.open(p, os.O_RDONLY) for p in {i.path for i in self.index.values()}}
        self._direct_fds = {p: fd for p in self._fds if direct and (fd := _open_direct(p)) is not None}
        self._opened = [*self._fds.values(), *self._direct_fds.values()]  # what close() closes
        self._staging = threading.local()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def info(self, key: str) -> TensorInfo:
        if key not in self.index:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}; it holds {len(self.index)} tensors, "
                                  f"e.g. {sorted(self.index)[:5]}.")
        return self.index[key]

    def read(self, key: str, pin_memory: bool = False) -> torch.Tensor:
        """A new CPU tensor with the stored bytes of `key` (pinned if asked, for async copies to a GPU)."""
        info = self.info(key)
        out = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.read_into(info, out)
        return out.view(info.dtype).view(info.shape)

    def read_many(self, keys: list[str], pin_memory: bool = False) -> list[torch.Tensor]:
        """Read several tensors into one buffer; the buffer is free again when the last of them dies.

        Without pin_memory the buffer is an anonymous mapping, never malloc: glibc's dynamic mmap threshold
        would move buffers of this size into its heaps, where freed layers stay in RSS (measured: 2x the
        peak RSS when streaming). Up to `pool` mappings are reused once free: a fresh mapping is zeroed and
        page-faulted by the kernel on first touch, which halves read throughput (measured 1.0 vs 2.0 GB/s).
        """
        infos = [self.info(k) for k in keys]
        offsets, total = _packed(infos)
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=True) if pin_memory else self._mapped(max(total, 1))
        out = []
        for info, offset in zip(infos, offsets, strict=True):
            part = flat[offset:offset + info.nbytes]
            self.read_into(info, part)
            out.append(part.view(info.dtype).view(info.shape))
        return out

    def read_many_bytes(self, keys: list[str]) -> int:
        """Bytes of the one buffer `read_many(keys)` reads into (`memfit plan` sizes the stream's reads by it)."""
        return _packed([self.info(k) for k in keys])[1]

    def _mapped(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over a free pooled mapping of >= nbytes, or over a new one."""
        with self._lock:  # picking a mapping and taking a tensor on it is one step: no two readers share one
            for buf in self._pool:
                # Every tensor made by frombuffer holds a reference to its mapping until its storage dies
                # (autograd's saved views included), so only the pool list, `buf` and the call refer to a
                # free one.
                if len(buf) >= nbytes and sys.getrefcount(buf) == 3:
                    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
            buf = mmap.mmap(-1, nbytes)
            if len(self._pool) < self.pool:
                self._pool.append(buf)
            return torch.frombuffer(buf, dtype=torch.uint8)

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (O_DIRECT) for at least one file."""
        return bool(self._direct_fds)

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill the uint8 CPU tensor `out` (info.nbytes long) with the stored bytes of one tensor."""
        self.read_span([info], [out])

    def read_span(self, infos: list[TensorInfo], outs: list[torch.Tensor]) -> None:
        """Fill each uint8 CPU tensor of `outs` with the bytes of its tensor in `infos`: tensors of one file, in
        file order, read as one span (one request per staging buffer, not one per tensor: an MoE expert's three
        matrices lie side by side in per-expert checkpoints)."""
        path = infos[0].path
        ordered = all(a.offset + a.nbytes <= b.offset for a, b in zip(infos, infos[1:], strict=False))
        if not ordered or any(i.path != path for i in infos):
            raise ValueError("read_span takes tensors of one file, in file order, not overlapping")
        fd = self._direct_fds.get(path)
        if fd is not None:
            try:
                self._read_direct(fd, infos, outs)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # The file system took O_DIRECT at open but refuses this read: buffered reads from now on. The
                # descriptor stays open until close(): another thread may be reading through it.
                self._direct_fds.pop(path, None)
                fd = None
        if fd is None:
            for info, out in zip(infos, outs, strict=True):
                self._read_buffered(info, out)
        with self._lock:
            self.bytes_read += sum(i.nbytes for i in infos)

    def _read_buffered(self, info: TensorInfo, out: torch.Tensor) -> None:
        view, fd = memoryview(out.numpy()), self._fds[info.path]
        _pread_full(fd, view, info.offset, info.nbytes, info)
        if self.drop_cache:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)

    def _read_direct(self, fd: int, infos: list[TensorInfo], outs: list[torch.Tensor]) -> None:
        """Read the aligned range around the span, a staging buffer at a time, and copy each tensor's bytes out."""
        begin, end = infos[0].offset, infos[-1].offset + infos[-1].nbytes
        pos = begin - begin % _DIRECT_ALIGN
        buf = self._staging_buffer()
        staged = torch.frombuffer(buf, dtype=torch.uint8)
        while pos < end:
            need = min(len(buf), end - pos)
            # The last aligned block may run past the end of the file: only the span's own bytes must arrive.
            _pread_full(fd, memoryview(buf)[: -(-need // _DIRECT_ALIGN) * _DIRECT_ALIGN], pos, need, infos[0])
            for info, out in zip(infos, outs, strict=True):
                lo, hi = max(info.offset, pos), min(info.offset + info.nbytes, pos + need)
                if lo < hi:
                    serial_copy_(out[lo - info.offset: hi - info.offset], staged[lo - pos: hi - pos])
            pos += need

    def staging_bytes(self, span: int) -> int:
        """Resident bytes of the staging buffer of a thread whose direct reads are spans of at most `span` bytes:
        the pages their aligned ranges touch, at most the buffer (0 when reads are buffered)."""
        aligned = -(-(span + _DIRECT_ALIGN - 1) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        return min(_DIRECT_CHUNK, aligned) if self.direct else 0

    def _staging_buffer(self) -> mmap.mmap:
        """This thread's page-aligned buffer (an anonymous mapping) for direct reads, allocated once."""
        buf = getattr(self._staging, "buf", None)
        if buf is None:
            buf = self._staging.buf = mmap.mmap(-1, _DIRECT_CHUNK)
        return buf

    def close(self) -> None:
        for fd in self._opened:
            os.close(fd)
        self._fds, self._direct_fds, self._opened, self._pool = {}, {}, [], []

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _packed(infos: list[TensorInfo]) -> tuple[list[int], int]:
    """(each tensor's offset, the total) of tensors laid back to back in one buffer, each at an `_ALIGN` offset."""
    offsets, total = [], 0
    for info in infos:
        offsets.append(total)
        total += -(-info.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor of `path`, or None where the platform or file system has no direct I/O (tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def _pread_full(fd: int, view: memoryview, offset: int, need: int, info: TensorInfo) -> None:
    """Read into `view` from `offset` until at least `need` bytes have arrived."""
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{info.path} ended while reading {info.key!r}; the file is truncated.")
        done += n
