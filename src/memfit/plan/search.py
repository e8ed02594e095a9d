"""`--memory B`: the settings of a fine-tune that fit B bytes with the least slowdown, chosen from traced plans.

What changes memory without changing what is learned: the micro-batch (the same examples per update, split into
--grad-accum micro-batches); then what changes the numerics slightly: the optimizer (AdamW's 8 B/param of state ->
AdamW8bit's 2.03); then streaming the frozen layers from disk (--weights-budget, the largest share of the weights
first: exact, but each streamed layer is read twice and recomputed per update); and, last, an NF4 base under an
adapter (QLoRA). Candidates are tried in that order (every split before the next switch).
Activations are linear in the micro-batch, so two traces (the requested batch and batch 1) predict every split; the
chosen one is traced again to confirm it. On the CPU the search turns --lean-allocator on: only then does the
measured peak follow the plan (bench/plan.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from memfit.adapters import AdapterConfig
from memfit.errors import ConfigError
from memfit.plan.predict import Plan, peak_of, plan_finetune, run_device, run_imports, runtime_bytes
from memfit.serve.loading import ServeConfig, serve_device
from memfit.tiers.budget import format_size, parse_size
from memfit.train.config import TrainConfig

# A plan must fit in this share of the budget: bench/plan.py's worst plan ÷ measured peak with --lean-allocator was
# 0.93 (0.90 in a run before the runtime counted the tokenizer): kernels' own scratch buffers and the pages of code
# the first update brings in are not traced.
MARGIN = 0.9
# Shares of the weights a streamed candidate keeps resident, the largest (least read from disk) first.
STREAM_SHARES = ("75%", "50%", "25%", "10%")


@dataclass
class Fit:
    train: TrainConfig
    plan: Plan
    changes: list[str]  # the flags that differ from the request, as they would be typed


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit_memory(model_dir: str | os.PathLike, adapter: AdapterConfig, train: TrainConfig, memory: int | str,
               task: str = "causal-lm", labels: list[str] | None = None, device: str | None = None,
               runtime: int | None = None) -> Fit:
    """The first candidate whose plan fits `memory` (with `MARGIN`); ConfigError naming the smallest budget that
    would fit and its largest component when none does. `runtime` as for `plan_finetune`."""
    budget = parse_size(memory)
    room = MARGIN * budget
    dev = run_device(train, device)
    runtime = runtime_bytes(model_dir, dev, runtime, run_imports(adapter))  # once: each trace leaves some behind
    kw = {"task": task, "labels": labels, "device": device, "runtime": runtime}
    if dev.type == "cpu":
        train = replace(train, lean_allocator=True)
    smallest: tuple[float, Plan, int, TrainConfig] | None = None
    for base in _candidates(train, adapter):
        try:
            full = plan_finetune(model_dir, adapter, base, **kw)
            one = full if train.batch_size == 1 else plan_finetune(model_dir, adapter, replace(base, batch_size=1),
                                                                   **kw)
        except ConfigError:
            if base.weights_budget == train.weights_budget:
                raise
            continue  # a share too small to stream this model (below its resident part and two layers)
        a1, an = one.get("activations"), full.get("activations")
        for micro in _divisors(train.batch_size):
            activations = a1 + (an - a1) * (micro - 1) / max(1, train.batch_size - 1)
            predicted = peak_of({**full.to_dict()["components"], "activations": activations})
            if smallest is None or predicted < smallest[0]:
                smallest = (predicted, one if micro == 1 else full, micro, base)
            if predicted > room:
                continue
            chosen = replace(base, batch_size=micro, grad_accum=train.grad_accum * train.batch_size // micro)
            plan = full if micro == train.batch_size else plan_finetune(model_dir, adapter, chosen, **kw)
            if plan.peak_bytes <= room:
                return Fit(chosen, plan, _changes(train, chosen, dev))
    assert smallest is not None
    need, plan, micro, base = smallest
    parts = [c for c in plan.components if c.name != "runtime"]
    top = max(parts, key=lambda c: c.bytes)
    flags = [f"--batch-size {micro}", f"--optim {base.optim}"] + [
        f"--{name.replace('_', '-')} {getattr(base, name)}" for name in ("weights_budget", "quantize")
        if getattr(base, name) is not None]
    streamable = any(c.weights_budget != train.weights_budget for c in _candidates(train, adapter))
    raise ConfigError(f"nothing fits in {format_size(budget)}: the smallest plan needs {format_size(need / MARGIN)} "
                      f"({', '.join(flags)}); its largest part is {top.name} ({format_size(top.bytes)})"
                      f"{_advice(top.name, streamable)}.")


def _candidates(train: TrainConfig, adapter: AdapterConfig) -> list[TrainConfig]:
    """The settings tried, each over every micro-batch: as requested, then AdamW8bit's states, then for an adapter
    run on an fp32 base in memory its frozen layers streamed at each of `STREAM_SHARES`, then an NF4 base (QLoRA:
    the frozen weights at 4.13 bits, a small change to the base's numerics). A base already streamed, offloaded or
    sharded is neither: --quantize combines with none of those (`TrainConfig` refuses each pair)."""
    out = [train]
    if train.optim == "adamw":
        out.append(replace(train, optim="adamw8bit"))
    lean = out[-1]
    if adapter.method != "full" and (train.quantize, train.weights_budget, train.expert_budget, train.shard) == (
            None, None, None, None):
        out += [replace(lean, weights_budget=share) for share in STREAM_SHARES]
        out.append(replace(lean, quantize="nf4"))
    return out


def _advice(component: str, streamable: bool) -> str:
    if component == "weights resident":
        if streamable:
            return (": what streaming leaves resident (the embedding, the head and norms; a streamed head is not "
                    "planned yet), or an NF4 base")
        return ": --weights-budget would stream it from disk"
    if component == "expert cache":
        return ": a smaller --expert-budget"
    if component == "activations":
        return ": lower --max-length"
    return ""


def _changes(requested: TrainConfig, chosen: TrainConfig, dev: torch.device) -> list[str]:
    flags = []
    if chosen.batch_size != requested.batch_size:
        flags += [f"--batch-size {chosen.batch_size}", f"--grad-accum {chosen.grad_accum}"]
    if chosen.optim != requested.optim:
        flags.append(f"--optim {chosen.optim}")
    if chosen.quantize != requested.quantize:
        flags.append(f"--quantize {chosen.quantize}")
    if chosen.weights_budget != requested.weights_budget:
        flags.append(f"--weights-budget {chosen.weights_budget}")
    if dev.type == "cpu":
        flags.append("--lean-allocator")
    return flags


@dataclass
class ServingFit:
    config: ServeConfig
    plan: Plan
    changes: list[str]


def fit_serving(model_dir: str | os.PathLike, config: ServeConfig, memory: int | str,
                generation: tuple[int, int, int] | None = None, runtime: int | None = None) -> ServingFit:
    """The settings of `memfit serve` (or, with generation = (prompt tokens, new tokens, prompts), of `memfit
    generate`) whose plan fits `memory` (with `MARGIN`): first less concurrency (--kv-budget halved for a server,
    --max-seqs for a generation: slower, the same text), then an NF4 base (slightly different logits) with the
    concurrency asked for and then less, then the fp32 base streamed from disk (the same text, every streamed layer
    read per token: the slowest) at each of `STREAM_SHARES`; the last two only for an fp32 base in memory (a
    streamed or offloaded base is quantized once, by memfit quantize). ConfigError naming the smallest plan when
    none fits."""
    from memfit.plan.generate import plan_generate, plan_serve

    budget = parse_size(memory)
    dev = serve_device(config)
    runtime = runtime_bytes(model_dir, dev, runtime)
    base = replace(config, lean_allocator=config.lean_allocator or dev.type == "cpu")
    smallest: tuple[int, ServeConfig] | None = None
    bases = [base]
    if (config.quantize, config.weights_budget, config.expert_budget) == (None, None, None):  # fp32, in memory
        bases += [replace(base, quantize="nf4"), *(replace(base, weights_budget=share) for share in STREAM_SHARES)]
    for candidates in (_less_concurrency(b, generation) for b in bases):
        for candidate in candidates:
            try:
                if generation is None:
                    plan = plan_serve(model_dir, candidate, runtime=runtime)
                else:
                    plan = plan_generate(model_dir, candidate, *generation, runtime=runtime)
            except ConfigError:
                if candidate.weights_budget == config.weights_budget:
                    raise
                break  # a share too small to stream this model
            if smallest is None or plan.peak_bytes < smallest[0]:
                smallest = (plan.peak_bytes, candidate)
            if plan.peak_bytes <= MARGIN * budget:
                return ServingFit(candidate, plan, _serving_changes(config, candidate))
    assert smallest is not None
    need, candidate = smallest
    raise ConfigError(f"nothing fits in {format_size(budget)}: the smallest plan needs {format_size(need / MARGIN)} "
                      f"({' '.join(_serving_changes(config, candidate)) or 'as asked'}); the weights do not "
                      "shrink further here (what streaming leaves resident, the embedding, head and norms, stays).")


def _less_concurrency(config: ServeConfig, generation: tuple[int, int, int] | None) -> list[ServeConfig]:
    """`config`, then with its concurrency halved step by step: --max-seqs down to 1 for a generation, --kv-budget
    down to one request of 512 tokens (or the generation's own length) for a server."""
    out = [config]
    if generation is not None:
        rows = min(config.max_seqs, generation[2])  # more rows than prompts change nothing
        while rows > 1:
            rows //= 2
            out.append(replace(config, max_seqs=rows))
    else:
        while out[-1].kv_budget // 2 >= 512:
            out.append(replace(out[-1], kv_budget=out[-1].kv_budget // 2))
    return out


def _serving_changes(requested: ServeConfig, chosen: ServeConfig) -> list[str]:
    flags = [f"--{name.replace('_', '-')} {getattr(chosen, name)}"
             for name in ("max_seqs", "kv_budget", "quantize", "weights_budget")
             if getattr(chosen, name) != getattr(requested, name)]
    return flags + (["--lean-allocator"] if chosen.lean_allocator and not requested.lean_allocator else [])
