"""Adapters by name for serving: device slots, host memory and disk, each an LRU (S-LoRA's unified cache).

An adapter runs only from a slot of the stacked tensors (`memfit.adapters.multi`); up to `slots` (--max-loras)
are there at once. Up to `host` (--max-cpu-loras) more stay in host memory as factors, so bringing one back to a
slot is a copy, not a read; the rest are read from their directories on demand. A slot that a running request
uses is pinned: it is never evicted under it, and a request waits when every slot is pinned.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from memfit.adapters.multi import Factors, MultiLoraLinear, lora_factors
from memfit.errors import ConfigError, MemfitError
from memfit.serve.metrics import Metrics


class AdapterCache:
    def __init__(self, wrapped: dict[str, MultiLoraLinear], skeleton: nn.Module, slots: int, host: int,
                 metrics: Metrics | None = None) -> None:
        if slots < 1 or host < 0:
            raise ConfigError(f"--max-loras must be >= 1 and --max-cpu-loras >= 0, got {slots} and {host}.")
        self.wrapped, self.skeleton, self.slots, self.host = wrapped, skeleton, slots, host
        self.metrics = metrics or Metrics()
        self.sources: dict[str, Path] = {}
        self._on_device: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._in_host: OrderedDict[str, Factors] = OrderedDict()
        self._pins = [0] * slots
        self._lock = threading.Lock()

    # -- registry ------------------------------------------------------------------------------------------------
    def add(self, name: str, directory: str | os.PathLike, factors: Factors | None = None) -> None:
        """Register adapter `name`, read now (or given as `factors`), so a bad directory fails before anyone asks
        for it."""
        if not name or name in self.sources:
            raise ConfigError(f"an adapter named {name!r} is already served; choose another name."
                              if name else "an adapter needs a non-empty name.")
        directory = Path(directory)
        factors = self._check(name, factors) if factors is not None else self._read(name, directory)
        with self._lock:
            self._keep_in_host(name, factors)
        self.sources[name] = directory

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.sources:
                raise ConfigError(f"no adapter named {name!r} is served.")
            slot = self._on_device.get(name)
            if slot is not None and self._pins[slot]:
                raise ConfigError(f"adapter {name!r} is in use by running requests; unload it when they finish.")
            if slot is not None:
                del self._on_device[name]
                self._fill(slot, None)
            self._in_host.pop(name, None)
            del self.sources[name]

    def names(self) -> list[str]:
        return list(self.sources)

    def host_bytes(self) -> int:
        """Bytes of the adapters kept in host memory (their factors as read)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for f in self._in_host.values() for a, b, _ in f.values()
                       for t in (a, b))

    # -- slots ---------------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> int | None:
        """A slot holding `name`, pinned until `release(slot)`; None when every slot is pinned (try again later)."""
        with self._lock:
            slot = self._on_device.get(name)
            if slot is not None:
                self._on_device.move_to_end(name)
                self.metrics.adapter_hits.labels("device").inc()
                self._pins[slot] += 1
                return slot
            slot = self._free_slot()
            if slot is None:
                return None
            factors = self._in_host.pop(name, None)
            if factors is not None:
                self.metrics.adapter_hits.labels("host").inc()
            else:
                factors = self._read(name, self.sources[name])
                self.metrics.adapter_loads.inc()
            self._fill(slot, factors)
            self._on_device[name] = slot
            self._keep_in_host(name, factors)  # the host copy makes the next return to a slot a copy
            self._pins[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._pins[slot] -= 1

    def _free_slot(self) -> int | None:
        used = set(self._on_device.values())
        free = [s for s in range(self.slots) if s not in used]
        if free:
            return free[0]
        for name, slot in self._on_device.items():  # least recently used first
            if not self._pins[slot]:
                del self._on_device[name]
                return slot
        return None

    def _fill(self, slot: int, factors: Factors | None) -> None:
        for module, layer in self.wrapped.items():
            layer.set_slot(slot, None if factors is None else factors.get(module))

    def _keep_in_host(self, name: str, factors: Factors) -> None:
        if self.host == 0:
            return
        self._in_host[name] = factors
        self._in_host.move_to_end(name)
        while len(self._in_host) > self.host:
            self._in_host.popitem(last=False)

    def _read(self, name: str, directory: Path) -> Factors:
        try:
            factors = lora_factors(directory, self.skeleton)
        except MemfitError as e:
            raise ConfigError(f"adapter {name!r} cannot be loaded from {directory}: {e}") from e
        return self._check(name, factors)

    def _check(self, name: str, factors: Factors) -> Factors:
        unknown = sorted(set(factors) - set(self.wrapped))
        if unknown:
            raise ConfigError(f"adapter {name!r} adapts modules this server does not serve adapters on ({unknown[:3]})"
                              "; it belongs to another model.")
        rank = max(a.shape[0] for a, _, _ in factors.values())
        capacity = next(iter(self.wrapped.values())).lora_A.shape[1]
        if rank > capacity:
            raise ConfigError(f"adapter {name!r} has rank {rank}, above the server's --max-lora-rank {capacity}.")
        for module, (a, b, _) in factors.items():
            layer = self.wrapped[module]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ConfigError(f"adapter {name!r}: {module} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])}, "
                                  f"the model's is ({layer.out_features}, {layer.in_features}); it belongs to another "
                                  "model.")
        return factors
