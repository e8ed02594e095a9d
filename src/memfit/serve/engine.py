"""Continuous batching over one model with many adapters (Orca's iteration-level scheduling, vLLM's loop).

Each step: finished and cancelled requests leave the batch (their KV rows and adapter slots are freed at once);
waiting requests join while the KV-cache budget and a free adapter slot allow, those of one step prefilled together
(left-padded); then one decode step runs for the whole batch: the base model's matmuls once, each row adding its
own adapter's delta (`memfit.adapters.multi`).

The batch shares one KV cache, left-padded to its longest row: a joining request's cache is padded on the left to
the batch length (or the batch to it), and columns that only padding uses are trimmed when rows leave. Positions
are each row's own count of real tokens, and the attention mask hides the padding, so a row decodes as it would
alone, up to float rounding. Memory is bounded by a token budget: rows × the longest row's prompt + max_new_tokens
never exceeds `kv_budget`, and requests that would pass it wait in the queue.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.adapters.multi import SlotRows
from memfit.errors import ConfigError
from memfit.serve.adapters import AdapterCache
from memfit.serve.metrics import Metrics


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy at temperature 0 (the default), else sampled from softmax(logits / T) within the
    smallest set of tokens whose probability reaches top_p. seed: a run is a function of it (None: random)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}.")


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation. on_token(id) is called for every new token, on_done(finish_reason) once at the end
    ("stop", "length", "cancelled", or "error: ..."), both from the engine's thread."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    on_token: Callable[[int], None] = lambda token: None
    on_done: Callable[[str], None] = lambda reason: None
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_reason: str | None = None
    slot: int = -1
    generator: torch.Generator | None = None

    @property
    def reserve(self) -> int:
        """KV-cache tokens this request may come to hold."""
        return len(self.prompt) + self.params.max_new_tokens


class Engine:
    """Runs requests on `model` (a causal LM, with `wrap_for_slots` applied when `adapters` is given)."""

    def __init__(self, model: nn.Module, eos_ids: set[int], adapters: AdapterCache | None = None,
                 rows: SlotRows | None = None, max_seqs: int = 16, kv_budget: int = 8192,
                 metrics: Metrics | None = None, context: int | None = None) -> None:
        if max_seqs < 1 or kv_budget < 1:
            raise ConfigError(f"--max-seqs and --kv-budget must be >= 1, got {max_seqs} and {kv_budget}.")
        self.model, self.eos_ids, self.adapters, self.rows = model.eval(), set(eos_ids), adapters, rows
        self.max_seqs, self.kv_budget = max_seqs, kv_budget
        self.context = context or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.metrics = metrics or Metrics()
        self.device = next((p.device for p in model.parameters() if p.numel()), torch.device("cpu"))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cache: Any = None  # the batch's DynamicCache
        self._mask: torch.Tensor | None = None  # [B, L] 1 where a cache column holds a real token
        self._work = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        from memfit.moe.generate import cache_kwarg

        self._cache_kwarg = cache_kwarg(model)

    # -- the outside world ---------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse what can never run, before it queues: ConfigError naming the limit."""
        if not request.prompt:
            raise ConfigError("the prompt is empty (it has no tokens); send some text.")
        if self.context is not None and request.reserve > self.context:
            raise ConfigError(f"the prompt has {len(request.prompt)} tokens and asks for "
                              f"{request.params.max_new_tokens} more: {request.reserve} tokens, above the model's "
                              f"context of {self.context}. Shorten the prompt or lower max_tokens.")
        if request.reserve > self.kv_budget:
            raise ConfigError(f"the request needs {request.reserve} tokens of KV cache, above the server's "
                              f"--kv-budget of {self.kv_budget}; shorten the prompt or lower max_tokens.")
        if request.adapter is not None and (self.adapters is None or request.adapter not in self.adapters.sources):
            raise ConfigError(f"no adapter named {request.adapter!r} is served.")

    def submit(self, request: Request) -> Request:
        self.check(request)
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)
        with self._work:
            self.waiting.append(request)
            self.metrics.waiting.set(len(self.waiting))
            self._work.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` (a client went away): its row and slot are freed at the next step."""
        request.cancelled = True
        with self._work:
            self._work.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="memfit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish every request already submitted, then stop the thread."""
        with self._work:
            self._stop = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self.waiting and not self.running and not self._stop:
                    self._work.wait()
                if self._stop and not self.waiting and not self.running:
                    return
            self.step()

    def kv_bytes(self) -> int:
        """Bytes of the running batch's KV cache now."""
        if self._cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self._cache.layers for t in (layer.keys, layer.values))

    def run_until_done(self) -> None:
        """Step in this thread until every submitted request has finished (for `memfit generate` and tests)."""
        while self.waiting or self.running:
            self.step()

    # -- one iteration -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        self._retire([r for r in self.running if r.cancelled], "cancelled")
        with self._work:  # other threads append to the queue
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                self.waiting.remove(request)
        for request in gone:
            self._finish(request, "cancelled")
        self._admit()
        if self.running:
            self._decode()
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))

    def _admit(self) -> None:
        """Prefill waiting requests, first come first served, while the batch, the KV budget and a slot allow; the
        requests admitted in one step are prefilled together, as one left-padded batch."""
        admitted: list[Request] = []
        while len(self.running) + len(admitted) < self.max_seqs:
            with self._work:
                if not self.waiting:
                    break
                request = self.waiting[0]
            rows = [*self.running, *admitted, request]
            if len(rows) * max(r.reserve for r in rows) > self.kv_budget:
                break  # it waits for rows to leave
            slot, error = -1, None
            if request.adapter is not None:
                try:
                    slot = self.adapters.acquire(request.adapter)
                except ConfigError as e:  # e.g. its directory went bad after it was registered
                    error = f"error: {e}"
                if slot is None:
                    break  # every slot is pinned: wait
            with self._work:
                self.waiting.popleft()
            if error is not None:
                self._finish(request, error)
                continue
            request.slot = slot
            admitted.append(request)
        if admitted:
            self._prefill(admitted)

    def _set_rows(self, slots: list[int]) -> None:
        if self.rows is not None:
            self.rows.set(slots, self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                 cache: Any) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), attention_mask=None if mask is None else mask.to(self.device),
                         position_ids=None if positions is None else positions.to(self.device), use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1].float()

    def _prefill(self, requests: list[Request]) -> None:
        """One forward over the prompts of `requests`, left-padded to the longest; their first tokens, and their
        cache rows joined to the batch's."""
        from transformers import DynamicCache

        length = max(len(r.prompt) for r in requests)
        ids = torch.tensor([[0] * (length - len(r.prompt)) + r.prompt for r in requests])
        mask = torch.tensor([[0] * (length - len(r.prompt)) + [1] * len(r.prompt) for r in requests])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts its own tokens from 0
        cache = DynamicCache()
        self._set_rows([r.slot for r in requests])
        logits = self._forward(ids, mask if len(requests) > 1 else None, positions if len(requests) > 1 else None,
                               cache)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests))
        self._join(requests, cache, mask)
        for request, row in zip(requests, logits, strict=True):
            self._emit(request, self._sample(row, request))

    def _join(self, requests: list[Request], cache: Any, mask: torch.Tensor) -> None:
        """Add prefilled rows (their cache and mask) to the batch's, left-padding whichever is shorter."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
                mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
            self._mask = torch.cat([_left_pad(self._mask, length, dim=1), _left_pad(mask, length, dim=1)])
        self.running.extend(requests)

    def _decode(self) -> None:
        ready = [r for r in self.running if r.finish_reason is None]
        self._retire([r for r in self.running if r.finish_reason is not None], None)
        if not ready:
            return
        ids = torch.tensor([[r.generated[-1]] for r in self.running])
        positions = self._mask.sum(dim=1, keepdim=True)  # [B, 1]: each row's own count of real tokens
        self._mask = torch.cat([self._mask, torch.ones(len(self.running), 1, dtype=torch.long)], dim=1)
        self._set_rows([r.slot for r in self.running])
        self.metrics.batch_size.observe(len(self.running))
        logits = self._forward(ids, self._mask, positions, self._cache)
        for request, row in zip(list(self.running), logits, strict=True):
            self._emit(request, self._sample(row, request))
        self._retire([r for r in self.running if r.finish_reason is not None], None)

    def _emit(self, request: Request, token: int) -> None:
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        request.generated.append(token)
        self.metrics.generated_tokens.inc()
        request.on_token(token)
        if token in self.eos_ids:
            request.finish_reason = "stop"
        elif len(request.generated) >= request.params.max_new_tokens:
            request.finish_reason = "length"

    def _retire(self, done: list[Request], reason: str | None) -> None:
        """Take `done` out of the batch: their cache rows, mask rows and adapter slots go at once."""
        if not done:
            return
        keep = [i for i, r in enumerate(self.running) if r not in done]
        if keep:
            index = torch.tensor(keep)
            self._mask = self._mask.index_select(0, index)
            first = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # columns only padding uses go
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, first:]
                layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, first:]
        else:
            self._cache, self._mask = None, None
        self.running = [self.running[i] for i in keep]
        for request in done:
            self._finish(request, reason or request.finish_reason)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.slot >= 0:
            self.adapters.release(request.slot)
            request.slot = -1
        request.on_done(reason)

    def _sample(self, logits: torch.Tensor, request: Request) -> int:
        params = request.params
        if params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # tokens past the nucleus
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=request.generator))


def _left_pad(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """`t` padded with zeros at the start of `dim` to `length` (KV: [B, H, L, D], dim 2; masks: [B, L], dim 1)."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
