"""Frozen-weight streaming: train on a model whose frozen base weights do not fit in memory.

Only a byte budget of the base weights stays resident: the non-layer weights (embeddings, final norm,
head), the trainable adapter parameters, as many whole decoder layers as the budget allows, and a
window of two streamed layers (the one computing and the next one, read by a background thread).
Every other layer lives on disk in the checkpoint's safetensors and is read just before it runs.

Backward needs a layer's weights again, so each streamed layer runs under non-reentrant activation
checkpointing: the backward pass re-runs the layer's forward, which reads its weights again (layers
in reverse order; the read order is known, so prefetch is always right). Losses and gradients are
bitwise those of the same model held in memory: the same kernels run on the same bytes.

How memory is really freed: a streamed parameter is a 0-element placeholder between uses. When the
layer runs, each placeholder is swapped for a fresh Parameter holding the weights read from disk,
and swapped back afterwards. Autograd may still hold the fresh tensors (the backward of the layer
being recomputed), so they are freed when autograd drops them, never overwritten under it.

Usage (model built without weights, adapters injected after, or a loaded model, injected before):

    with empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    handle = stream_weights(model, "path/to/checkpoint", "2GB")
    memfit.inject(model, LoraConfig(...))
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import CheckpointError, ConfigError
from memfit.tiers.budget import format_size, parse_budget
from memfit.tiers.memory import trim_heap
from memfit.tiers.modules import checkpoint_key, find_layers, load_resident, param_aliases, vocabulary
from memfit.tiers.st_reader import SafetensorsReader
from memfit.tiers.vocab import VocabStream, streamable

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache" since transformers 5.24


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def checkpointed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) under non-reentrant activation checkpointing, as a streamed layer runs in training (the
    planner traces the same): caches off, since the recompute in backward must see the same inputs (a KV cache would
    be appended to twice)."""
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def read_buffer_bytes(params: dict[int, list[_StreamedParam]], reader: SafetensorsReader) -> int:
    """Resident bytes of the stream's reads at their most, as `StreamHandle._read_layer` allocates them: one
    `read_many` mapping per layer, of which the reader's pool keeps two resident (the computing layer and the
    prefetched one, reused once free), plus a converted copy of each of those two layers when the checkpoint stores
    another dtype than the model computes in (`.to(dtype)` copies then)."""
    sizes = []
    for layer in params.values():
        stored = reader.read_many_bytes([s.key for s in layer])
        converted = sum(s.nbytes for s in layer if reader.info(s.key).dtype != s.dtype)
        sizes.append(stored + converted)
    return sum(sorted(sizes)[-2:])


@dataclass(frozen=True)
class _StreamedParam:
    """One streamed tensor: its owner module inside the layer, attribute, checkpoint key, dtype, size, and the
    table it lives in: a parameter, or a buffer of a module that marks its buffers as streamable weights
    (`memfit_streamable_buffers`: a quantized weight's codes and scales)."""

    owner: str
    name: str
    key: str
    dtype: torch.dtype
    nbytes: int
    table: str = "_parameters"


@dataclass
class StreamStats:
    """Counters since the last `reset()`: what streaming cost."""

    bytes_read: int = 0  # bytes read from the checkpoint for streamed layers
    layer_reads: int = 0
    sync_reads: int = 0  # reads the compute thread had to start itself (prefetch had nothing in flight)
    wait_s: float = 0.0  # time the compute thread waited for reads
    read_s: float = 0.0  # time spent reading (background thread included)

    def reset(self) -> None:
        self.__init__()


@dataclass
class _Loaded:
    tensors: list[torch.Tensor]
    event: torch.cuda.Event | None = None


class StreamHandle:
    """The running stream of one model: plan, counters, and `close()` to stop streaming."""

    def __init__(self, model: nn.Module, reader: SafetensorsReader, layers: nn.ModuleList,
                 params: dict[int, list[_StreamedParam]], pinned: list[int], budget: int, resident_bytes: int,
                 device: torch.device, vocab: VocabStream | None = None) -> None:
        self.model, self.reader, self.layers, self.params = model, reader, layers, params
        self.streamed = sorted(params)
        self.pinned = pinned
        self.budget, self.resident_bytes, self.device = budget, resident_bytes, device
        self.layer_bytes = {i: sum(s.nbytes for s in params[i]) for i in self.streamed}
        self.stats = StreamStats()
        self._stats_lock = threading.Lock()
        self.vocab = vocab  # the embedding and head, when they are streamed too; their reads count here
        if vocab is not None:
            vocab.count = self.count_read
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-stream")
        self._ready: dict[int, _Loaded] = {}
        self._pending: dict[int, Future] = {}
        self._next: int | None = None
        self._inner = {i: self.layers[i].forward for i in self.streamed}  # each layer's own forward
        for i in self.streamed:
            self.layers[i].forward = functools.partial(self._forward, i)

    # -- accounting -------------------------------------------------------------------------------
    @property
    def streamed_bytes(self) -> int:
        """Bytes of base weights that live on disk and are read per use."""
        return sum(self.layer_bytes.values()) + (self.vocab.nbytes if self.vocab else 0)

    def count_read(self, nbytes: int) -> None:
        """Count a read made outside the layer reads (vocabulary rows and chunks)."""
        with self._stats_lock:
            self.stats.bytes_read += nbytes

    @property
    def window_bytes(self) -> int:
        """Most bytes of streamed layers held at once: the computing layer and the prefetched one."""
        sizes = sorted(self.layer_bytes.values())
        return sum(sizes[-2:])

    def memory(self) -> dict[str, int]:
        return {"budget": self.budget, "resident": self.resident_bytes, "window": self.window_bytes,
                "streamed": self.streamed_bytes, "vocab": self.vocab.nbytes if self.vocab else 0}

    def wrap_forward(self, i: int, wrap) -> None:
        """Replace streamed layer i's own forward by `wrap(forward)`, which runs while the layer's weights are
        resident (between its read and its release): MeZO's paired passes run both halves of a batch in one visit."""
        self._inner[i] = wrap(self._inner[i])

    # -- the layer call ---------------------------------------------------------------------------
    def _forward(self, i: int, *args, **kwargs):
        forward = self._inner[i]
        if not torch.is_grad_enabled():
            return self._run(i, forward, None, *args, **kwargs)
        calls = [0]  # 0 before the forward, 1 before the backward's recompute
        return checkpointed(self._run, i, forward, calls, *args, **kwargs)

    def _run(self, i: int, forward, calls: list[int] | None, *args, **kwargs):
        backward = calls is not None and calls[0] > 0
        if calls is not None:
            calls[0] += 1
        self._acquire(i, self._predict(i, backward, training=calls is not None))
        try:
            return forward(*args, **kwargs)
        finally:  # also runs when the recompute stops early (torch.utils.checkpoint's early stop)
            self._release(i)

    def _predict(self, i: int, backward: bool, training: bool) -> int:
        """The next streamed layer to run: forward goes up, backward comes down, both wrap around."""
        pos = self.streamed.index(i)
        if backward:
            return self.streamed[pos - 1] if pos > 0 else i  # layer 0 opens the next step's forward
        if pos + 1 < len(self.streamed):
            return self.streamed[pos + 1]
        return i if training else self.streamed[0]  # the last layer opens the backward

    # -- residency --------------------------------------------------------------------------------
    def _acquire(self, i: int, nxt: int) -> None:
        loaded = self._take(i)
        keep = {i: loaded}
        if nxt in self._ready:
            keep[nxt] = self._ready[nxt]
        self._ready = keep
        for j in list(self._pending):
            if j != nxt:
                self._pending.pop(j).cancel()  # a stale prefetch: its result is dropped when it finishes
        if nxt not in self._ready and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self._read_layer, nxt)
        self._next = nxt
        self._install(i, loaded)

    def _take(self, i: int) -> _Loaded:
        if i in self._ready:
            return self._ready[i]
        t0 = time.perf_counter()
        future = self._pending.pop(i, None)
        if future is None:
            self.stats.sync_reads += 1
            loaded = self._read_layer(i)
        else:
            loaded = future.result()
        self.stats.wait_s += time.perf_counter() - t0
        return loaded

    def _release(self, i: int) -> None:
        layer = self.layers[i]
        for param in self.params[i]:
            owner = layer.get_submodule(param.owner)
            getattr(owner, param.table)[param.name] = self._placeholder(param)
        if self._next != i:
            self._ready.pop(i, None)
        trim_heap()  # the recomputed layers' activations churn through the heap: 109 -> 87 MB peak growth

    def _install(self, i: int, loaded: _Loaded) -> None:
        if loaded.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(loaded.event)
            for t in loaded.tensors:
                t.record_stream(stream)  # the copy stream allocated it; keep it until compute is done
            loaded.event = None
        layer = self.layers[i]
        for param, tensor in zip(self.params[i], loaded.tensors, strict=True):
            owner = layer.get_submodule(param.owner)
            if param.table == "_buffers":
                owner._buffers[param.name] = tensor
                continue
            if owner._parameters[param.name].requires_grad:
                raise ConfigError(f"layer {i}'s {param.owner}.{param.name} is streamed but now trainable; streaming "
                                  "serves frozen base weights only. Train it with streaming off, or keep it frozen.")
            owner._parameters[param.name] = nn.Parameter(tensor, requires_grad=False)

    def _placeholder(self, param: _StreamedParam) -> torch.Tensor:
        empty = torch.empty(0, dtype=param.dtype, device=self.device)
        return empty if param.table == "_buffers" else nn.Parameter(empty, requires_grad=False)

    def _read_layer(self, i: int) -> _Loaded:
        t0 = time.perf_counter()
        host = self.reader.read_many([s.key for s in self.params[i]], pin_memory=self._cuda)
        event = None
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):  # overlaps the copy with compute on the default stream
                tensors = [t.to(self.device, s.dtype, non_blocking=True)
                           for t, s in zip(host, self.params[i], strict=True)]
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            tensors = [t.to(s.dtype) for t, s in zip(host, self.params[i], strict=True)]
        with self._stats_lock:  # a stale prefetch may still be running beside a synchronous read
            self.stats.read_s += time.perf_counter() - t0
            self.stats.bytes_read += sum(_nbytes(t) for t in host)
            self.stats.layer_reads += 1
        return _Loaded(tensors, event)

    # -- end --------------------------------------------------------------------------------------
    def close(self, materialize: bool = True) -> None:
        """Stop streaming. materialize=True reads every streamed weight back into memory (to merge or save
        the full model); False leaves the placeholders (the model then cannot run those layers)."""
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for i in self.streamed:
            self.layers[i].__dict__.pop("forward", None)
            if materialize:
                self._install(i, self._read_layer(i))
        if self.vocab is not None:
            self.vocab.close(materialize)
            self.vocab = None
        self._ready, self._pending, self._inner = {}, {}, {}
        self.reader.close()
        if getattr(self.model, "memfit_stream", None) is self:
            del self.model.memfit_stream

    def __enter__(self) -> StreamHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plan_layer(layer: nn.Module, prefix: str, names: dict, reader: SafetensorsReader) -> list[_StreamedParam]:
    params = []
    for owner_name, owner in layer.named_modules():
        for attr, p in owner._parameters.items():
            if p is None or p.requires_grad and not p.is_meta:
                continue
            full = f"{prefix}.{owner_name}.{attr}" if owner_name else f"{prefix}.{attr}"
            key = checkpoint_key(names.get(p, [full]), reader)
            if key is None:
                if p.is_meta:
                    raise CheckpointError(f"the checkpoint has no tensor for {full!r} (looked up by name and "
                                          "name suffix); is it the checkpoint of this model?")
                continue  # a frozen tensor the checkpoint lacks stays resident with its current value
            params.append(_StreamedParam(owner_name, attr, key, p.dtype, p.numel() * p.element_size()))
        if getattr(owner, "memfit_streamable_buffers", False):
            for attr, b in owner._buffers.items():
                full = f"{prefix}.{owner_name}.{attr}" if owner_name else f"{prefix}.{attr}"
                key = checkpoint_key([full], reader)
                if key is None:
                    raise CheckpointError(f"the checkpoint has no tensor for {full!r}; is it the quantized "
                                          "checkpoint of this model (memfit quantize)?")
                params.append(_StreamedParam(owner_name, attr, key, b.dtype, b.numel() * b.element_size(),
                                             "_buffers"))
    return params


def stream_weights(model: nn.Module, checkpoint_dir: str | os.PathLike, budget_bytes: int | float | str, *,
                   device: str | torch.device | None = None, drop_cache: bool = True,
                   vocab: bool = False) -> StreamHandle:
    """Keep at most `budget_bytes` of `model`'s weights resident; read the rest layer by layer from disk.

    checkpoint_dir: the base model's safetensors (one file, or shards with model.safetensors.index.json).
        Every frozen base weight is (re)loaded from it, so the model may be built in `empty_weights()`.
    budget_bytes: bytes, a size like "2GB", or a share of the model's weight bytes like "25%"; must hold the
        resident part plus two layers.
    device: where weights are used (default: the device of the model's first real parameter, else CPU).
    drop_cache: drop read ranges from the page cache, so memory use is what this process holds.
    vocab: stream the input embedding (rows read per lookup) and the output head (read in vocabulary chunks, see
        `memfit.tiers.vocab`) instead of keeping them resident: for training, where a step reads the head twice
        (the chunked loss and its backward); generation reads it once per token, so it keeps them resident.
    Returns a handle with the plan (`streamed`, `pinned`, `memory()`) and `stats`; `close()` stops streaming.
    """
    if getattr(model, "memfit_stream", None) is not None:
        raise ConfigError("this model already streams its weights; close the first handle before streaming again.")
    if device is None:
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    device = torch.device(device)
    reader = SafetensorsReader(checkpoint_dir, drop_cache=drop_cache, pool=2)  # the two-layer window
    try:
        layout = stream_layout(model, reader, budget_bytes, vocab)
        embedding, head, keys = layout.embedding, layout.head, layout.keys
        vocab_stream = VocabStream(reader, embedding, keys.get(embedding), head, keys.get(head), device) \
            if embedding is not None or head is not None else None
        resident = _resident_bytes(model, layout.streamed)
        load_resident(model, reader, layout.streamed, device=device)
    except BaseException:
        reader.close()
        raise
    handle = StreamHandle(model, reader, layout.layers, layout.params, layout.pinned, layout.budget, resident, device,
                          vocab_stream)
    if vocab_stream is not None:
        vocab_stream.install()
    for i in handle.streamed:
        handle._release(i)  # frees the weights the model was built with
    model.memfit_stream = handle
    return handle


@dataclass
class StreamLayout:
    """What `stream_weights` streams: the streamed layers' tensors (`params`, by layer), the layers kept whole
    (`pinned`), the embedding and head read from disk (None: resident) with their checkpoint keys, and the budget."""

    layers: nn.ModuleList
    params: dict[int, list[_StreamedParam]]
    pinned: list[int]
    embedding: nn.Embedding | None
    head: nn.Linear | None
    keys: dict[nn.Module, str]
    budget: int

    @property
    def streamed(self) -> list[torch.Tensor]:
        """The model's tensors that live on disk."""
        return _tensors(self.layers, self.params) + [m.weight for m in (self.embedding, self.head) if m is not None]


def stream_layout(model: nn.Module, reader: SafetensorsReader, budget_bytes: int | float | str,
                  vocab: bool = False) -> StreamLayout:
    """The layout `stream_weights` gives `model` under `budget_bytes` (see there), from the model's shapes and the
    checkpoint's headers alone: `memfit plan` calls it on a model of fake tensors. Streamed tensors are the frozen
    ones (or meta ones) the checkpoint holds."""
    prefix, layers = find_layers(model)
    names = param_aliases(model)
    params = {i: _plan_layer(layer, f"{prefix}.{i}", names, reader) for i, layer in enumerate(layers)}
    total = _resident_bytes(model, set())
    budget = parse_budget(budget_bytes, total, "the model's weight bytes")
    embedding, head = _vocab_candidates(model, names) if vocab and budget < total else (None, None)
    keys = {m: checkpoint_key(names.get(m.weight, []), reader) for m in (embedding, head) if m is not None}
    embedding, head = (m if keys.get(m) else None for m in (embedding, head))  # absent: a fresh head
    embedding, head = _vocab_on_disk(model, layers, params, budget, embedding, head)
    on_disk = [m.weight for m in (embedding, head) if m is not None]
    pinned = _choose_pinned(model, layers, params, budget, on_disk)
    for i in pinned:
        del params[i]
    return StreamLayout(layers, params, pinned, embedding, head, keys, budget)


def _tensors(layers: nn.ModuleList, params: dict[int, list[_StreamedParam]]) -> list[torch.Tensor]:
    return [getattr(layers[i].get_submodule(s.owner), s.table)[s.name] for i in params for s in params[i]]


def _resident_bytes(model: nn.Module, streamed: list[torch.Tensor]) -> int:
    ids = {id(t) for t in streamed}
    params = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in ids)
    return params + sum(_nbytes(b) for b in model.buffers() if id(b) not in ids)


def _vocab_candidates(model: nn.Module, names: dict) -> tuple[nn.Embedding | None, nn.Linear | None]:
    """The input embedding and output head that can stream; a weight shared with a module that cannot (a tied
    table whose other side stays resident) streams on neither side."""
    embedding, head = streamable(*vocabulary(model))
    chosen = [m for m in (embedding, head) if m is not None]

    def alone(m: nn.Module | None) -> nn.Module | None:
        holders = sum(c.weight is m.weight for c in chosen) if m is not None else 0
        return m if m is not None and len(names.get(m.weight, [])) <= holders else None

    return alone(embedding), alone(head)


def _vocab_on_disk(model: nn.Module, layers: nn.ModuleList, params: dict[int, list[_StreamedParam]], budget: int,
                   embedding: nn.Embedding | None, head: nn.Linear | None) -> tuple[nn.Module | None, nn.Module | None]:
    """Which of the candidate embedding and head stream: an untied embedding whenever the model does not fit
    (a lookup reads only its tokens' rows, and the result is exact); the head, and a tied embedding with it, only
    when the budget cannot hold the resident part and two layers otherwise (it is read twice a step, and the
    loss becomes the vocabulary-chunked one, equal to float rounding)."""
    if embedding is not None and head is not None and embedding.weight is head.weight:
        cheap, costly = None, (embedding, head)
    else:
        cheap, costly = embedding, (None, head)
    if costly[1] is None:
        return cheap, None
    sizes = [sum(s.nbytes for s in layer) for layer in params.values()]
    need = _resident_bytes(model, _tensors(layers, params) + ([cheap.weight] if cheap is not None else []))
    if budget >= need + 2 * max(sizes):
        return cheap, None
    return costly[0] or cheap, costly[1]


def _choose_pinned(model: nn.Module, layers: nn.ModuleList, params: dict[int, list[_StreamedParam]],
                   budget: int, on_disk: list[torch.Tensor]) -> list[int]:
    """Layers kept resident: as many of the last layers as fit beside the two-layer streaming window."""
    sizes = {i: sum(s.nbytes for s in params[i]) for i in params}
    resident = _resident_bytes(model, _tensors(layers, params) + on_disk)
    biggest = max(sizes.values())
    need = resident + 2 * biggest
    if budget < need:
        raise ConfigError(
            f"weights budget {format_size(budget)} is too small: the resident part (embeddings, norms, head, "
            f"adapters) takes {format_size(resident)} and streaming needs two layers of {format_size(biggest)} "
            f"at once, {format_size(need)} in all. Raise the budget to at least {format_size(need)}."
        )
    if budget >= resident + sum(sizes.values()):
        return list(range(len(layers)))  # everything fits: nothing to stream
    pinned, free = [], budget - need
    for i in reversed(range(len(layers))):
        if sizes[i] > free:
            break
        pinned.append(i)
        free -= sizes[i]
    return sorted(pinned)
