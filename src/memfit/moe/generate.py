"""Generation helpers for offloaded models: timed generation, offline batches with token scheduling, and the checks
that turn bad prompts and a cache too small for a batch into one clear line before anything runs."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from memfit.errors import DataError, MemfitError
from memfit.moe.schedule import in_order_batches, plan_batches, route_signatures
from memfit.tiers.budget import format_size


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
    if input_ids.shape[-1] == 0:
        raise DataError("the prompt has no tokens; there is nothing to continue (give it some text).")
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


def prompt_ids(tokenizer, prompts: list[str], names: list[str] | None = None, vocab_size: int | None = None,
               fix: str = "give every prompt some text to continue.",
               error: type[MemfitError] = DataError) -> list[torch.Tensor]:
    """Token ids (1-D) of each prompt, checked so that a bad prompt is one line naming it (`names[i]`, e.g.
    "prompts.jsonl:3"; default "prompt i") instead of a reshape error deep inside the model: empty or
    whitespace-only text, text the tokenizer turns into no tokens, and ids beyond the model's `vocab_size`
    (a tokenizer that is not the model's, which would index past the embedding)."""
    names = names or [f"prompt {i + 1}" for i in range(len(prompts))]
    out = []
    for text, name in zip(prompts, names, strict=True):
        if not text.strip():
            raise error(f"{name}: the prompt is {'only whitespace' if text else 'empty'}, so there is nothing to "
                        f"continue; {fix}")
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if ids.numel() == 0:
            raise error(f"{name}: the prompt {_clip(text)} tokenizes to no tokens (the tokenizer drops every "
                        f"character of it); {fix}")
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, name)
        out.append(ids)
    return out


def check_token_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """A DataError if a token id lies outside the model's vocabulary (it would index past the embedding)."""
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocab_size:
        raise DataError(f"{where}: the tokenizer gives token id {top}, but the model's vocabulary has {vocab_size} "
                        "tokens: the tokenizer is not this model's. Save the model's own tokenizer in its directory "
                        "(tokenizer.save_pretrained).")


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def working_set(num_experts: int, top_k: int, batch: int) -> int:
    """The most distinct experts one MoE layer can need in one decode step of `batch` sequences. (A batch's
    prefill can need every expert of a layer, but once; the decode step is what repeats.)"""
    return min(num_experts, batch * top_k)


def cache_warning(model: nn.Module, batch_size: int, budget: int | str) -> str | None:
    """One line saying that batches of `batch_size` need more expert slots than the cache has, with the budget
    and the batch size that would fit; None when they fit. `budget` is what the user asked for (to echo it).

    Criterion: the slots must hold one layer's working set W (its experts are protected from prefetches while
    it runs) plus the next layer's up to W predicted experts, which the predictor prefetches during it: 2W
    (W with a single MoE layer, which has no next layer). Below W, a layer's own experts evict each other
    within the step and nearly every access misses; between W and 2W the next layer's prefetches find no room
    and many miss. Without a predictor nothing is prefetched, and hits need experts to outlive the other
    layers' traffic, which takes more still: 2W is the least any policy needs. Measured on the tests' tiny
    Mixtral (3 MoE layers of 8 experts, top-2, batches of 4 so W = 8, predictive + cross-layer): hit ratio
    0.05 with 6 slots, 0.26 with 8, 0.60 with 12, 0.78 with 16 = 2W; LRU without predictor 0.00 with 8,
    0.53 with 16."""
    runtime = model.memfit_moe
    top_k = model.config.num_experts_per_tok
    E, layers = runtime.num_experts, len(runtime.order)
    slots, total = runtime.cache.slots, len(runtime.store.keys())
    per_layer = working_set(E, top_k, batch_size)
    need = min(total, per_layer * (2 if layers > 1 else 1))
    if slots >= need:
        return None
    expert = runtime.store.expert_bytes
    share = math.ceil(1000 * need / total) / 10  # rounded up, so the suggested share really holds `need` slots
    fits = slots // (2 * top_k if layers > 1 else top_k)  # the largest batch whose 2W fits
    smaller = f" or lower --batch-size to {fits}" if 1 <= fits < batch_size else ""
    severity = ("most accesses will miss" if slots < per_layer else
                "the next layer's prefetches find no room, so many accesses will miss")
    return (f"a batch of {batch_size} can use up to {per_layer} experts per layer per step, but the expert cache "
            f"holds {slots} (--expert-budget {budget}, {format_size(slots * expert)}) and running one layer while "
            f"the next is prefetched takes {need}; {severity}. Raise --expert-budget to at least {share:g}% "
            f"({format_size(need * expert)}){smaller}.")


@torch.no_grad()
def generate_requests(model: nn.Module, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                      schedule: bool = False, progress: Callable[[int], None] | None = None) -> BatchReport:
    """Generate for every prompt in batches of `batch_size` (left-padded), regrouped by predicted routes if
    `schedule`; completions come back in the input order."""
    encoded = prompt_ids(tokenizer, prompts, vocab_size=getattr(model.config, "vocab_size", None))
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


def cache_kwarg(model: nn.Module) -> str:
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

    cache = {cache_kwarg(model): DynamicCache()}
    t0 = time.perf_counter()
    model(input_ids=input_ids[:, :prefill], use_cache=True, **cache)
    t1 = time.perf_counter()
    if on_prefilled is not None:
        on_prefilled()
    for i in range(prefill, input_ids.shape[1]):
        model(input_ids=input_ids[:, i: i + 1], use_cache=True, **cache)
    t2 = time.perf_counter()
    return Timing(input_ids.shape[1] - prefill + 1, input_ids.shape[0], t1 - t0, t2 - t1)
