"""The offloaded experts of one model at run time: store, cache, policy, predictor, hooks and statistics.

Per MoE layer and forward step:
  1. A pre-hook on the layer's norm sees the residual stream; the predictor turns it into predictions
     for later layers, which become prefetch requests (the nearest layer and the likeliest experts first;
     they replace older requests for the same layer) and tell the policy what is coming.
  2. The layer's experts module calls `begin` with the experts the router chose: they are protected
     from speculative eviction, stale requests are withdrawn, the policy settles that layer's prediction
     (unused prefetches are demoted; it learns which needed experts were in memory in time), and the
     missing experts are queued as urgent reads for the prefetch thread. It returns an order to compute
     in: ready experts first (compute overlaps the reads), then those being read, then the missing ones
     from the far end of the urgent queue, so the compute thread and the prefetch thread read different
     experts at the same time.
  3. `expert(layer, e)` pins one expert's slot while its matmuls run.

Training adds a backward, whose reads are known: a forward that builds a graph records each layer's experts
(`begin(..., record=True)`), and the backward visits the layers in reverse. When it starts, the cache's
eviction is handed to `_Belady` over that schedule (the expert needed furthest ahead leaves first; experts
the backward no longer needs leave by the inference policy's order, which keeps what the next forward
likes); each layer's backward queues its own misses as urgent reads and every later backward layer's
experts as prefetches in order, and the policy comes back when the first layer's backward ends.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from memfit.moe.arch import MoeArch
from memfit.moe.policies import ExpertPolicy
from memfit.moe.predictors import Prediction, Predictor
from memfit.moe.store import ExpertStore
from memfit.tiers.budget import format_size
from memfit.tiers.slots import SlotCache
from memfit.tiers.transfer import TransferStats

_URGENT = -1.0  # priority of a layer's own misses: ahead of every prediction (priorities >= 0)


class OffloadRuntime:
    def __init__(self, layers: dict[int, nn.Module], arch: MoeArch, store: ExpertStore, slots: int,
                 policy: ExpertPolicy, predictor: Predictor | None, fingerprint: str, resident_bytes: int,
                 prefetch: bool, io_threads: int) -> None:
        self.layers, self.arch, self.store, self.policy, self.predictor = layers, arch, store, policy, predictor
        self.fingerprint, self.resident_bytes = fingerprint, resident_bytes
        self.order = sorted(layers)
        self.rank = {l: i for i, l in enumerate(self.order)}
        self.num_experts = store.num_experts
        self.stats = TransferStats()
        self.layer_stats: dict[int, list[int]] = {l: [0, 0, 0] for l in self.order}  # hits, late, misses
        self.phase = "forward"
        self.phase_stats = _phase_counters()  # {"forward"|"backward": [hits, late, misses, bytes read]}
        self._bytes_mark = 0
        self._record: list[tuple[int, list[int]]] = []  # (layer, experts) of the graph-building forward, in order
        self._next_use: dict[tuple[int, int], int] = {}  # backward only: key -> backward layers until its use
        self._schedule: list[list[tuple[int, int]]] = []  # backward only: keys of this layer, then of the next ones
        self.cache = SlotCache(slots, store.expert_numel, store.slot_dtype, store.fill, policy, self.stats, prefetch,
                               io_threads)
        # A model dropped without close() must not leave its prefetch thread, cache and files behind.
        self._finalize = weakref.finalize(self, _shutdown, self.cache, store.reader)
        self._hooks = []
        for l, layer in layers.items():
            self._hooks.append(getattr(layer, arch.norm).register_forward_pre_hook(
                lambda m, args, l=l: self._on_residual(l, args[0])))
            if policy.wants_scores:
                self._hooks.append(layer.mlp.gate.register_forward_hook(
                    lambda m, args, out, l=l: self._on_router(l, out[0])))

    # -- the model's events ----------------------------------------------------------------------------
    def _on_residual(self, layer: int, residual: torch.Tensor) -> None:
        if self.predictor is None:
            return
        for prediction in self.predictor.predict(layer, residual.reshape(-1, residual.shape[-1])):
            self._request(layer, prediction)

    def _request(self, now: int, prediction: Prediction) -> None:
        """Prefetch the union of the predicted top-k experts of every token, nearest layer first."""
        target = prediction.layer
        experts = prediction.topk.flatten().unique()
        probs = prediction.probs[:, experts].amax(dim=0).tolist()
        guess = dict(zip(experts.tolist(), probs, strict=True))
        distance = self.rank[target] - self.rank[now] - 1
        with self.cache.lock:
            self.policy.predicted(target, guess)
        self.cache.withdraw(lambda k: k[0] == target)
        self.cache.prefetch([(distance + 1.0 - p, (target, e)) for e, p in guess.items()])

    def _on_router(self, layer: int, logits: torch.Tensor) -> None:
        scores = self.arch.scores(logits.detach()).mean(dim=0)
        with self.cache.lock:
            self.policy.router_scores(layer, scores)

    # -- the experts module's calls --------------------------------------------------------------------
    def begin(self, layer: int, needed: list[int], record: bool = False) -> list[int]:
        """Layer `layer` needs experts `needed` now; returns the order to compute them in. record: the forward
        builds a graph, and the backward will need the same experts (in reverse layer order)."""
        if record:
            if self._record and self.rank[self._record[-1][0]] >= self.rank[layer]:
                self._record.clear()  # a new forward: a record no backward consumed is stale
            if self.phase == "backward":  # a forward inside a backward (checkpoint recomputation): no plan holds
                self._end_backward_plan()
                self._record.clear()
            self._record.append((layer, needed))
        keys = [(layer, e) for e in needed]
        self.cache.protect(keys)
        rank = self.rank[layer]
        self.cache.withdraw(lambda k: self.rank[k[0]] <= rank)
        ready = [k for k in keys if k in self.cache]
        loading = [k for k in keys if self.cache.loading(k)]
        missing = [k for k in keys if k not in ready and k not in loading]
        with self.cache.lock:
            self.policy.layer_started(layer, needed, {e for _, e in ready})
        self.cache.prefetch([(_URGENT, k) for k in missing], urgent=True)
        return [e for _, e in ready + loading + missing[::-1]]

    @contextlib.contextmanager
    def expert(self, layer: int, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(gate_up [2I, H], down [H, I]) of one expert, resident while the block runs."""
        s = self.stats
        before = (s.hits, s.late, s.misses)
        slot = self.cache.get((layer, e))
        counts, phase = self.layer_stats[layer], self.phase_stats[self.phase]
        for i, (b, a) in enumerate(zip(before, (s.hits, s.late, s.misses), strict=True)):
            counts[i] += a - b
            phase[i] += a - b
        try:
            yield self.store.views(slot)
        finally:
            self.cache.release((layer, e))

    def end(self, layer: int, needed: list[int]) -> None:
        self.cache.unprotect([(layer, e) for e in needed])

    def begin_backward(self, layer: int, needed: list[int]) -> list[int]:
        """The backward of layer `layer` needs `needed` again; returns the order to compute them in."""
        if self.phase != "backward":
            self._switch("backward")
            with self.cache.lock:
                self.cache.policy = _Belady(self.policy, self._next_use)
        if self._record and self._record[-1] == (layer, needed):
            self._record.pop()
        else:  # not the graph the record describes (two forwards, one backward): read on demand from here
            self._record.clear()
        keys = [(layer, e) for e in needed]
        self._schedule = [keys, *([(l, e) for e in es] for l, es in reversed(self._record))]
        with self.cache.lock:
            self._next_use.clear()
            for distance, later in reversed(list(enumerate(self._schedule))):
                self._next_use.update(dict.fromkeys(later, distance))
        self.cache.protect(keys)
        self.cache.withdraw(lambda k: True)
        ready = [k for k in keys if k in self.cache]
        loading = [k for k in keys if self.cache.loading(k)]
        missing = [k for k in keys if k not in ready and k not in loading]
        self.cache.prefetch([(_URGENT, k) for k in missing], urgent=True)
        self._prefetch_ahead()
        return [e for _, e in ready + loading + missing[::-1]]

    def backward_done(self, layer: int, e: int) -> None:
        """Expert `e` of the layer in backward is done: its slot may take a later layer's expert now."""
        key = (layer, e)
        with self.cache.lock:
            self._next_use.pop(key, None)
        self.cache.unprotect([key])
        self._prefetch_ahead()

    def _prefetch_ahead(self) -> None:
        """Queue the next two backward layers' experts, nearest first; a request no slot admitted earlier is
        queued again as slots free up (each expert done frees one)."""
        self.cache.prefetch([(d + i / len(later), k) for d, later in enumerate(self._schedule[1:3])
                             for i, k in enumerate(later)])

    def end_backward(self, layer: int, needed: list[int]) -> None:
        self.cache.unprotect([(layer, e) for e in needed])
        if not self._record:  # the first layer's backward: the step's reads are done
            self._end_backward_plan()

    def abort_backward(self, layer: int, needed: list[int]) -> None:
        """The backward of `layer` failed: the layers below it will not run, so their plan is dropped."""
        self.cache.unprotect([(layer, e) for e in needed])
        self._record.clear()
        self.cache.withdraw(lambda k: True)
        self._end_backward_plan()

    def _end_backward_plan(self) -> None:
        """Hand eviction back to the inference policy and count what follows as forward."""
        with self.cache.lock:
            self.cache.policy = self.policy
            self._next_use.clear()
        self._schedule = []
        self._switch("forward")

    def _switch(self, phase: str) -> None:
        """Attribute the bytes read since the last switch to the phase that ends."""
        read = self.stats.bytes_read
        self.phase_stats[self.phase][3] += read - self._bytes_mark
        self._bytes_mark, self.phase = read, phase

    # -- reporting -------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self.cache.lock:
            self.stats.reset()
            self.layer_stats = {l: [0, 0, 0] for l in self.order}
            self.phase_stats, self._bytes_mark = _phase_counters(), 0

    def phase_summary(self) -> dict[str, dict[str, float]]:
        """Per pass ("forward", "backward"): hits, late, misses, hit ratio and bytes read (a read is counted in
        the pass during which it completed)."""
        out = {}
        for phase, (hits, late, misses, nbytes) in self.phase_stats.items():
            if phase == self.phase:  # the pass in progress: its reads since the last switch
                nbytes += self.stats.bytes_read - self._bytes_mark
            accesses = hits + late + misses
            out[phase] = {"hits": hits, "late": late, "misses": misses, "bytes_read": nbytes,
                          "hit_ratio": hits / accesses if accesses else 0.0}
        return out

    def memory(self) -> dict[str, int]:
        """Bytes: the expert cache (its budget), one expert, all experts, and the resident non-expert weights."""
        return {"expert_cache": self.cache.nbytes, "slots": self.cache.slots, "expert": self.store.expert_bytes,
                "experts_total": self.store.total_bytes, "resident": self.resident_bytes}

    def describe(self) -> str:
        m = self.memory()
        predictor = self.predictor.name if self.predictor is not None else "none"
        return (f"{m['slots']} of {len(self.store.keys())} experts cached ({format_size(m['expert_cache'])} of "
                f"{format_size(m['experts_total'])}), policy {self.policy.name}, predictor {predictor}, resident "
                f"weights {format_size(m['resident'])}")

    def close(self) -> None:
        """Stop prefetching and release the checkpoint's files; the model can no longer run its experts."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._finalize()


def _phase_counters() -> dict[str, list[int]]:
    return {"forward": [0, 0, 0, 0], "backward": [0, 0, 0, 0]}


class _Belady:
    """Eviction for the backward, whose future is known: `next_use` maps each expert the rest of the backward
    needs to how many backward layers ahead it is; the one needed furthest ahead leaves first, and those never
    needed again leave by `inner`'s order. A prefetch only replaces an expert needed later than itself. Cache
    events still reach `inner`, so its bookkeeping is intact when it takes over again."""

    def __init__(self, inner: ExpertPolicy, next_use: dict[tuple[int, int], int]) -> None:
        self.inner, self.next_use = inner, next_use

    def _when(self, key: tuple[int, int]) -> float:
        return self.next_use.get(key, float("inf"))

    def inserted(self, key, prefetched: bool) -> None:
        self.inner.inserted(key, prefetched)

    def accessed(self, key) -> None:
        self.inner.accessed(key)

    def evicted(self, key) -> None:
        self.inner.evicted(key)

    def victim(self, candidates: list) -> tuple[int, int]:
        latest = max(self._when(k) for k in candidates)
        tied = [k for k in candidates if self._when(k) == latest]
        return self.inner.victim(tied) if latest == float("inf") else tied[0]

    def admits(self, incoming, victim) -> bool:
        return self._when(incoming) < self._when(victim)


def _shutdown(cache: SlotCache, reader) -> None:
    cache.close()
    reader.close()
