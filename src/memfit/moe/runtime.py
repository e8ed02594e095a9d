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
    def begin(self, layer: int, needed: list[int]) -> list[int]:
        """Layer `layer` needs experts `needed` now; returns the order to compute them in."""
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
        counts = self.layer_stats[layer]
        for i, (b, a) in enumerate(zip(before, (s.hits, s.late, s.misses), strict=True)):
            counts[i] += a - b
        try:
            yield self.store.views(slot)
        finally:
            self.cache.release((layer, e))

    def end(self, layer: int, needed: list[int]) -> None:
        self.cache.unprotect([(layer, e) for e in needed])

    # -- reporting -------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self.cache.lock:
            self.stats.reset()
            self.layer_stats = {l: [0, 0, 0] for l in self.order}

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


def _shutdown(cache: SlotCache, reader) -> None:
    cache.close()
    reader.close()
