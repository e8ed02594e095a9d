"""The memory terms of runs that keep weights on disk, on a model of fake tensors: frozen layers streamed under
--weights-budget (`memfit.tiers.stream`) and MoE experts behind an --expert-budget cache (`memfit.moe`).

Which tensors stay resident is decided by the engine's own code from the model's shapes and the checkpoint's
headers (`stream_layout`, `expert_store`, `expert_slots`), and what the engine's reads hold is its own count
(`read_buffer_bytes`, the reader's and the store's staging buffers), so a plan and its run share one rule. The
activations are traced as for any run, through what the engine changes: streamed layers run under activation
checkpointing in training, and offloaded experts run `OffloadedExperts`' own forward and recomputing backward on
one fake slot. A fake tensor has no routing, so the trace routes the k x T top-k choices evenly over the experts
(the total of rows every expert computes is the routing's, whatever it is).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.moe.arch import arch_for, moe_layers
from memfit.moe.experts import OffloadedExperts
from memfit.moe.loader import DEFAULT_IO_THREADS, expert_slots, expert_store
from memfit.plan.components import Component
from memfit.quant.checkpoint import is_quantized_dir, read_meta
from memfit.tiers.budget import format_size
from memfit.tiers.st_reader import SafetensorsReader
from memfit.tiers.stream import checkpointed, read_buffer_bytes, stream_layout


def plan_stream(model: nn.Module, root: Path, budget: str | int, training: bool) -> tuple[list[torch.Tensor],
                                                                                        Component]:
    """(the tensors that live on disk, the stream's read buffers) of `model` streamed under `budget`, as
    `stream_weights` lays it out (training streams the embedding too, as `memfit finetune` does). In training,
    each streamed layer runs under activation checkpointing, as the stream runs it."""
    model.requires_grad_(False)  # the frozen base, as the stream sees it (adapters are injected after)
    with SafetensorsReader(root, drop_cache=False) as reader:
        layout = stream_layout(model, reader, budget, vocab=training)
        if layout.head is not None:
            raise ConfigError(f"--weights-budget {budget} streams the output head too (the budget is below the "
                              "resident part and two layers), which memfit plan does not model yet; plan a larger "
                              "budget, or measure the run with memfit finetune.")
        buffers = read_buffer_bytes(layout.params, reader)
    if training:
        for i in layout.params:
            layer = layout.layers[i]
            layer.forward = functools.partial(_checkpointed, layer.forward)
    streamed = layout.streamed
    on_disk = sum(t.numel() * t.element_size() for t in streamed)
    vocab = " and the embedding (its rows read per lookup)" if layout.embedding is not None else ""
    note = (f"budget {format_size(layout.budget)}: reads of the computing and the prefetched layer; "
            f"{len(layout.params)} layers{vocab} on disk ({format_size(on_disk)})")
    return streamed, Component("stream buffers", buffers, note)


def _checkpointed(forward, *args, **kwargs):
    return checkpointed(forward, *args, **kwargs) if torch.is_grad_enabled() else forward(*args, **kwargs)


def plan_experts(model: nn.Module, root: Path, budget: str | int) -> list[Component]:
    """The expert cache and the reads' staging buffers of `model` with its experts offloaded under `budget`, as
    `memfit.moe.load` builds them; the model's experts become `OffloadedExperts` over one fake slot."""
    arch = arch_for(model.config)
    layers = moe_layers(model)
    quant = (read_meta(root).get("experts") or None) if is_quantized_dir(root) else None
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with SafetensorsReader(root, drop_cache=False, direct=True) as reader:  # as load opens it (drop_cache)
        store = expert_store(reader, arch, layers, dtype, root, quant)
        slots = expert_slots(budget, store, model.config.num_experts_per_tok)
        threads = DEFAULT_IO_THREADS + 1  # the prefetch workers and the compute thread (its misses) all read
        staging = threads * (reader.staging_bytes(store.span_bytes) + store.staging_bytes)
    runtime = _PlanRuntime(store.views(torch.empty(store.expert_numel, dtype=store.slot_dtype)))
    for l, (_, layer) in layers.items():
        layer.mlp.experts = _EvenExperts(runtime, l, store.num_experts, layer.mlp.experts.act_fn)
    model.requires_grad_(False)  # as load leaves it; the adapter is injected after
    return [Component("expert cache", slots * store.expert_bytes, f"{slots} of {len(store.keys())} experts of "
                      f"{format_size(store.expert_bytes)}; {format_size(store.total_bytes)} on disk"),
            Component("expert reads", staging, f"staging buffers of {threads} reading threads")]


class _EvenExperts(OffloadedExperts):
    """`OffloadedExperts` with the top-k choices spread evenly: every expert computes ceil(k x T / E) rows."""

    def needed(self, top_k_index: torch.Tensor) -> list[int]:
        return list(range(self.num_experts))

    def routed(self, by_expert_k: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = -(-by_expert_k.numel() // self.num_experts)
        index = torch.zeros(rows, dtype=torch.long, device=by_expert_k.device)
        return index, index.clone()


class _PlanRuntime:
    """Stands for `OffloadRuntime` in a trace: every expert is the one held fake slot, no read, no prefetch."""

    def __init__(self, views: tuple) -> None:
        self.views = views

    def begin(self, layer: int, needed: list[int], record: bool = False) -> list[int]:
        return needed

    def begin_backward(self, layer: int, needed: list[int]) -> list[int]:
        return needed

    @contextlib.contextmanager
    def expert(self, layer: int, e: int) -> Iterator[tuple]:
        yield self.views

    def end(self, *args) -> None:
        pass

    end_backward = abort_backward = backward_done = end


def resident(tensors: list[torch.Tensor], streamed: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` but those that share a storage with a streamed one (`plan_offload`'s first result): what stays in
    memory, each tied weight judged by its one storage."""
    on_disk = {t.untyped_storage()._cdata for t in streamed}
    return [t for t in tensors if t.untyped_storage()._cdata not in on_disk]


def plan_offload(model: nn.Module, root: Path, weights_budget: str | int | None, expert_budget: str | int | None,
                 training: bool) -> tuple[list[torch.Tensor], list[Component]]:
    """(the tensors that live on disk, the components the offloading adds) of `model` as the loaders build it: its
    experts offloaded under `expert_budget` (which the loaders take first), else streamed under `weights_budget`."""
    if expert_budget is not None:
        return [], plan_experts(model, root, expert_budget)
    if weights_budget is not None:
        streamed, buffers = plan_stream(model, root, weights_budget, training)
        return streamed, [buffers]
    return [], []
