"""A byte-budgeted cache of equal-size slots over a slow tier, filled on demand or by a prefetch thread.

All memory is one tensor of `slots x slot_numel`, allocated once: the cache never holds more than its
budget, however the items churn, and the allocator never fragments. Items are filled in place by a
caller-supplied `fill(key, out) -> bytes_read` (e.g. positional reads of safetensors ranges).

The compute thread calls `get` / `release` around each use of an item, and background workers (one, or a
few to keep a device queue busy) serve `prefetch` requests in priority order (lower first). A miss is read
at once by the compute thread itself, so it never queues behind speculative reads. Which item leaves when a
slot is needed is the `SlotPolicy`'s choice; a speculative prefetch only evicts an item the policy `admits`
it over, while an urgent read (a miss, or an urgent request) always finds a slot.

Rules that keep it deadlock-free: the compute thread holds at most one pinned item while it calls `get`,
and a worker never waits for a slot (a request with no slot to take is dropped).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from memfit.tiers.transfer import TransferStats

Key = Hashable


class SlotPolicy(Protocol):
    """Chooses which resident item leaves. Called with the cache's lock held, from either thread."""

    def inserted(self, key: Key, prefetched: bool) -> None: ...

    def accessed(self, key: Key) -> None: ...

    def evicted(self, key: Key) -> None: ...

    def victim(self, candidates: list[Key]) -> Key:
        """The candidate to evict (candidates are ready, unpinned and not empty)."""
        ...

    def admits(self, incoming: Key, victim: Key) -> bool:
        """Whether a speculative read of `incoming` is worth evicting `victim`."""
        ...


@dataclass
class _Entry:
    slot: int
    ready: bool = False
    pins: int = 0
    prefetched: bool = False  # read by a speculative request
    urgent: bool = False  # read by an urgent request: a miss of the step, read by the worker
    used: bool = False
    error: BaseException | None = None


class SlotCache:
    """`slots` items of `slot_numel` elements of `dtype` each, keyed by any hashable.

    prefetch: start the background workers (False: every item is read on demand); workers: how many.
    """

    def __init__(self, slots: int, slot_numel: int, dtype: torch.dtype, fill: Callable[[Key, torch.Tensor], int],
                 policy: SlotPolicy, stats: TransferStats | None = None, prefetch: bool = True,
                 workers: int = 1) -> None:
        if slots < 1:
            raise ValueError("a slot cache needs at least one slot")
        if workers < 1:
            raise ValueError(f"a slot cache needs at least one prefetch worker, got workers={workers}")
        self.pool = torch.empty(slots, slot_numel, dtype=dtype)
        self.fill, self.policy = fill, policy
        self.stats = stats if stats is not None else TransferStats()
        self.lock = threading.Lock()  # guards everything below and the policy's state: hold it to update the policy
        # Two conditions on the one lock, so each wakes only who needs it: a Python thread woken for nothing
        # still has to take the GIL back from the compute thread (measured: 15% of decode time in lock
        # handoffs when every release woke the worker).
        self._work = threading.Condition(self.lock)  # workers wait here for requests
        self._done = threading.Condition(self.lock)  # the compute thread waits here for a read or a slot
        self._waiting = 0  # compute-thread waits in progress
        self._free = list(range(slots - 1, -1, -1))
        self._entries: dict[Key, _Entry] = {}
        self._protected: set[Key] = set()
        self._heap: list[tuple[float, int, Key]] = []
        self._queued: dict[Key, tuple[int, bool]] = {}  # key -> (seq of its live heap item, urgent)
        self._seq = itertools.count()
        self._closed = False
        self._workers = [threading.Thread(target=self._serve, name="memfit-prefetch", daemon=True)
                         for _ in range(workers if prefetch else 0)]
        for worker in self._workers:
            worker.start()

    @property
    def slots(self) -> int:
        return self.pool.shape[0]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def __contains__(self, key: Key) -> bool:
        with self.lock:
            entry = self._entries.get(key)
            return entry is not None and entry.ready

    def resident(self) -> list[Key]:
        with self.lock:
            return [k for k, e in self._entries.items() if e.ready]

    def loading(self, key: Key) -> bool:
        with self.lock:
            entry = self._entries.get(key)
            return entry is not None and not entry.ready

    # -- compute thread -------------------------------------------------------------------------------
    def get(self, key: Key) -> torch.Tensor:
        """The slot holding `key`, pinned until `release(key)`; waits for a read in flight, reads a miss.

        A key that an urgent request (the step's own misses, read beside the compute thread) brought in
        counts as a miss on its first use, never as a hit."""
        with self.lock:
            self.stats.accesses += 1
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
                demand = entry.urgent and not entry.used
                if entry.ready:
                    self._count(hit=not demand, demand=demand)
                else:
                    self._count(hit=False, demand=demand)
                    t0 = time.perf_counter()
                    while not entry.ready and entry.error is None:
                        self._wait()
                    self.stats.stall_s += time.perf_counter() - t0
                    if entry.error is not None:
                        raise entry.error
                self._use(key, entry)
                return self.pool[entry.slot]
            self.stats.misses += 1
            self._withdraw_one(key)
            t0 = time.perf_counter()
            slot = self._allocate(protected_ok=True)
            while slot is None:  # every slot is pinned or being read: one of them frees soon
                self._wait()
                slot = self._allocate(protected_ok=True)
            entry = self._entries[key] = _Entry(slot, pins=1)
        self._load(key, entry)
        with self.lock:
            self.stats.stall_s += time.perf_counter() - t0
            self._use(key, entry)
        return self.pool[entry.slot]

    def release(self, key: Key) -> None:
        with self.lock:
            entry = self._entries[key]
            entry.pins -= 1
            if entry.pins == 0 and self._waiting:
                self._done.notify_all()

    def protect(self, keys: Iterable[Key]) -> None:
        """Keep `keys` from being evicted by prefetches (the items a step is about to use)."""
        with self.lock:
            self._protected.update(keys)

    def unprotect(self, keys: Iterable[Key]) -> None:
        with self.lock:
            self._protected.difference_update(keys)

    # -- prefetch -------------------------------------------------------------------------------------
    def prefetch(self, requests: Iterable[tuple[float, Key]], urgent: bool = False) -> None:
        """Queue reads of (priority, key), lower priority first; resident keys are skipped. Urgent requests
        may evict any unprotected item; others only what the policy admits them over."""
        with self.lock:
            for priority, key in requests:
                if key in self._entries:
                    continue
                seq = next(self._seq)
                self._queued[key] = (seq, urgent)
                heapq.heappush(self._heap, (priority, seq, key))
            if self._queued:
                self._work.notify(len(self._queued))  # at most one waiting worker per request

    def withdraw(self, drop: Callable[[Key], bool]) -> None:
        """Drop the queued (not yet started) requests whose key satisfies `drop`."""
        with self.lock:
            for key in [k for k in self._queued if drop(k)]:
                self._withdraw_one(key)
            if len(self._heap) > 4 * len(self._queued) + 64:  # the heap keeps withdrawn items until popped
                self._heap = [item for item in self._heap if self._queued.get(item[2], (None,))[0] == item[1]]
                heapq.heapify(self._heap)

    def queued(self) -> list[Key]:
        with self.lock:
            return list(self._queued)

    def close(self) -> None:
        """Stop the workers (after their reads in flight). The cache stays readable but prefetches stop."""
        with self.lock:
            self._closed = True
            self._queued.clear()
            self._heap.clear()
            self._work.notify_all()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()

    # -- internals (lock held unless said) -------------------------------------------------------------
    def _wait(self) -> None:
        """Wait (lock held) for the next read done or slot freed."""
        self._waiting += 1
        try:
            self._done.wait()
        finally:
            self._waiting -= 1

    def _count(self, hit: bool, demand: bool) -> None:
        """Classify an access to a present entry: ready (hit), being read (late), or a step's own miss."""
        if demand:
            self.stats.misses += 1
        elif hit:
            self.stats.hits += 1
        else:
            self.stats.late += 1

    def _withdraw_one(self, key: Key) -> None:
        request = self._queued.pop(key, None)
        if request is not None and not request[1]:
            self.stats.prefetch_dropped += 1

    def _use(self, key: Key, entry: _Entry) -> None:
        if entry.prefetched and not entry.used:
            self.stats.prefetch_used += 1
        entry.used = True
        self.policy.accessed(key)

    def _allocate(self, incoming: Key | None = None, protected_ok: bool = False) -> int | None:
        """A free slot, evicting if needed, or None. incoming: a speculative read, which only evicts what the
        policy admits it over; protected_ok: a miss of the compute thread, which may take a protected item's
        slot when nothing else can go (so it always makes progress)."""
        if self._free:
            return self._free.pop()
        evictable = [k for k, e in self._entries.items() if e.ready and e.pins == 0]
        candidates = [k for k in evictable if k not in self._protected]
        if not candidates and protected_ok:
            candidates = evictable
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        if incoming is not None and not self.policy.admits(incoming, victim):
            return None
        entry = self._entries.pop(victim)
        self.policy.evicted(victim)
        self.stats.evictions += 1
        if entry.prefetched and not entry.used:
            self.stats.prefetch_wasted += 1
        return entry.slot

    def _load(self, key: Key, entry: _Entry) -> None:
        """Fill `entry`'s slot (lock not held). On failure the entry is removed and waiters see the error."""
        t0 = time.perf_counter()
        try:
            nbytes = self.fill(key, self.pool[entry.slot])
        except BaseException as e:
            with self.lock:
                entry.error = e
                del self._entries[key]
                self._free.append(entry.slot)
                self._done.notify_all()
            raise
        with self.lock:
            entry.ready = True
            self.stats.reads += 1
            self.stats.bytes_read += nbytes
            self.stats.read_s += time.perf_counter() - t0
            self.policy.inserted(key, entry.prefetched)
            if self._waiting:
                self._done.notify_all()

    def _next_request(self) -> tuple[Key, bool] | None:
        while self._heap:
            _, seq, key = heapq.heappop(self._heap)
            live = self._queued.get(key)
            if live is not None and live[0] == seq:
                del self._queued[key]
                return key, live[1]
        return None

    def _serve(self) -> None:
        """The prefetch worker: read queued requests in priority order into slots the policy gives up."""
        while True:
            with self.lock:
                request = None
                while not self._closed and request is None:
                    request = self._next_request()
                    if request is None:
                        self._work.wait()
                if self._closed:
                    return
                key, urgent = request
                if key in self._entries:
                    continue
                slot = self._allocate(incoming=None if urgent else key)
                if slot is None:
                    self.stats.prefetch_dropped += not urgent
                    continue
                entry = self._entries[key] = _Entry(slot, prefetched=not urgent, urgent=urgent)
                self.stats.prefetch_issued += not urgent
            # A failed read is re-raised by a waiter (entry.error); a key nobody waits for is read again on use.
            with contextlib.suppress(Exception):
                self._load(key, entry)
