"""Generation helpers for offloaded models: timed generation, and offline batches with token scheduling."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from memfit.moe.schedule import in_order_batches, plan_batches, route_signatures


class _Clock(StoppingCriteria):
    """Records when each new token is out (generate calls stopping criteria once per step); calls `on_first`
    once the prefill's token is out."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.times: list[float] = []
        self.on_first = on_first

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if not self.times and self.on_first is not None:
            self.on_first()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Timing:
    new_tokens: int  # per sequence
    batch: int
    prefill_s: float  # up to the first new token
    decode_s: float  # the remaining new tokens

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first, over the whole batch."""
        return self.batch * (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.batch * self.new_tokens / total if total > 0 else 0.0


@torch.no_grad()
def timed_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   max_new_tokens: int = 32, on_first: Callable[[], None] | None = None,
                   **kwargs) -> tuple[torch.Tensor, Timing]:
    """Greedy `generate` (unless kwargs say otherwise) with prefill and decode timed apart; `on_first` runs
    when the prefill is done (e.g. `model.memfit_moe.reset_stats` to count decoding alone)."""
    clock = _Clock(on_first)
    kwargs.setdefault("do_sample", False)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    n = out.shape[1] - input_ids.shape[1]
    first = clock.times[0] if clock.times else time.perf_counter()
    last = clock.times[-1] if clock.times else first
    return out, Timing(n, input_ids.shape[0], first - t0, last - first)


class ExpertCounter:
    """Counts the distinct experts each MoE layer uses per forward call (hooks on the routers)."""

    def __init__(self, model: nn.Module) -> None:
        runtime = model.memfit_moe
        self.calls: dict[int, list[int]] = {l: [] for l in runtime.order}
        self._hooks = [runtime.layers[l].mlp.gate.register_forward_hook(
            lambda m, args, out, l=l: self.calls[l].append(int(out[2].unique().numel()))) for l in runtime.order]

    def decode_mean(self) -> float:
        """Distinct experts per layer per decode step (every call after each generate's first)."""
        steps = [n for counts in self.calls.values() for n in counts[1:]]
        return sum(steps) / len(steps) if steps else 0.0

    def reset(self) -> None:
        for counts in self.calls.values():
            counts.clear()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@dataclass
class BatchReport:
    completions: list[str]  # in the input order
    batches: list[list[int]]
    distinct_experts: float  # per MoE layer per decode step, averaged over batches
    new_tokens: int = 0
    seconds: float = 0.0
    per_batch: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def generate_requests(model: nn.Module, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                      schedule: bool = False, progress: Callable[[int], None] | None = None) -> BatchReport:
    """Generate for every prompt in batches of `batch_size` (left-padded), regrouped by predicted routes if
    `schedule`; completions come back in the input order."""
    encoded = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    if schedule:
        batches = plan_batches(route_signatures(model, encoded), batch_size)
    else:
        batches = in_order_batches(len(prompts), batch_size)
    completions: list[str] = [""] * len(prompts)
    counter = ExpertCounter(model)
    per_batch, new_tokens, seconds = [], 0, 0.0
    try:
        for batch in batches:
            ids, mask = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
            counter.reset()
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            seconds += time.perf_counter() - t0
            new = out[:, ids.shape[1]:]
            new_tokens += new.numel()
            for i, row in zip(batch, new, strict=True):
                completions[i] = tokenizer.decode(row, skip_special_tokens=True)
            per_batch.append(counter.decode_mean())
            if progress is not None:
                progress(len(batch))
    finally:
        counter.close()
    return BatchReport(completions, batches, sum(per_batch) / len(per_batch), new_tokens, seconds, per_batch)


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def replay(model: nn.Module, input_ids: torch.Tensor, prefill: int,
           on_prefilled: Callable[[], None] | None = None) -> Timing:
    """Teacher-forced cached decoding of given text: prefill `input_ids[:, :prefill]`, then feed the remaining
    tokens one step at a time through the KV cache, as generation would, but with the text's own tokens.

    Measures a cache on realistic routing: a small model's own greedy output soon repeats itself, and
    repeated tokens route the same way, which would flatter every cache."""
    from transformers import DynamicCache

    cache = {_cache_kwarg(model): DynamicCache()}
    t0 = time.perf_counter()
    model(input_ids=input_ids[:, :prefill], use_cache=True, **cache)
    t1 = time.perf_counter()
    if on_prefilled is not None:
        on_prefilled()
    for i in range(prefill, input_ids.shape[1]):
        model(input_ids=input_ids[:, i: i + 1], use_cache=True, **cache)
    t2 = time.perf_counter()
    return Timing(input_ids.shape[1] - prefill + 1, input_ids.shape[0], t1 - t0, t2 - t1)
