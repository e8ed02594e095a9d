"""The memory table a run prints at its start (planned) and end (measured): where the bytes of training go.

Rows: frozen weights resident, frozen weights streamed from disk (or, for a Mixture-of-Experts model with offloaded
experts, the expert cache and the experts on disk), trainable weights, gradients, optimizer
states (in memory, and on disk for disk offload), activations (peak of the first update above what was held
before it) and the peak since training started (the one peak figure a run reports: the progress bar shows it as
it grows, the summary and metrics.jsonl's "end" event give its final value). Sizes are per rank under FSDP2 (each
rank holds its shards).
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from memfit.optim.adamw8bit import local
from memfit.quant import quantized_modules
from memfit.tiers.budget import format_size

# Bytes of optimizer state per trainable parameter before the first step allocates it, and where it lives.
PLANNED_STATE = {"adamw": (8.0, "memory"), "adamw8bit": (2.03, "memory"), "offload-cpu": (12.0, "host RAM"),
                 "offload-disk": (12.0, "disk"), "mezo": (0.0, "memory")}


def _nbytes(t: torch.Tensor) -> int:
    t = local(t)
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes in memory, bytes on disk) of the optimizer's state; aliases of the parameters are not counted."""
    params = {local(p).data_ptr() for g in optimizer.param_groups for p in g["params"]}
    seen, memory = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                ptr = value.data_ptr()
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    memory += _nbytes(value)
    store = getattr(optimizer, "store", None)
    disk = sum(p.stat().st_size for p in store.root.glob("*.swap")) if store is not None else 0
    return memory, disk


def memory_rows(model: nn.Module, optimizer: torch.optim.Optimizer, optim_name: str, stream: Any = None,
                measured: dict[str, int] | None = None) -> list[tuple[str, str, str]]:
    """(component, size, note) rows; `measured` (the trainer's probes) switches from plan to measurement."""
    trainable = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    n_trainable = sum(local(p).numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(_nbytes(p) for p in model.parameters() if not p.requires_grad)
    buffers = sum(_nbytes(b) for b in model.buffers())
    rows = []
    if stream is not None:
        mem = stream.memory()
        rows.append(("weights resident", format_size(mem["resident"] + mem["window"]),
                     f"budget {format_size(mem['budget'])}: resident part + a window of 2 streamed layers"))
        v = stream.vocab
        parts = [] if v is None else [p for p, m in (("embedding rows", v.embedding), ("head chunks", v.head)) if m]
        vocab = "".join(f" + {p}" for p in parts)
        rows.append(("weights streamed", format_size(mem["streamed"]), f"read from disk per use ({len(stream.streamed)}"
                     f" layers{vocab})"))
    else:
        quantized = quantized_modules(model)
        note = "frozen base weights and buffers"
        if quantized:
            kinds = sorted({w.kind for w in quantized.values()})
            note += (f" ({len(quantized)} weights in {'/'.join(kinds)}: "
                     f"{format_size(sum(w.nbytes for w in quantized.values()))})")
        rows.append(("weights resident", format_size(frozen + buffers), note))
        experts = getattr(model, "memfit_moe", None)
        if experts is not None:
            mem = experts.memory()
            rows.append(("expert cache", format_size(mem["expert_cache"]), f"{mem['slots']} experts of "
                         f"{format_size(mem['expert'])}, read as routed and again by the backward"))
            rows.append(("experts on disk", format_size(mem["experts_total"]), "frozen, in the checkpoint's "
                         "safetensors"))
        else:
            rows.append(("weights streamed", format_size(0), "--weights-budget streams layers from disk"))
    rows.append(("trainable weights", format_size(trainable), f"{n_trainable:,} parameters"))
    if getattr(optimizer, "zeroth_order", False):
        rows.append(("gradients", format_size(0), "none: MeZO runs forward passes only"))
    else:
        rows.append(("gradients", format_size(trainable), "one per trainable weight"))
    if measured is None:
        per_param, where = PLANNED_STATE.get(optim_name, (8.0, "memory"))
        if hasattr(optimizer, "planned_state_bytes"):  # low-rank states: from the shapes and the rank
            per_param = optimizer.planned_state_bytes() / max(1, n_trainable)
        size = format_size(per_param * n_trainable)
        rows.append(("optimizer states", size if where == "memory" else f"0 B (+{size} in {where})",
                     f"{optim_name}: ~{per_param:.3g} B/param"))
        rows.append(("activations", "-", "measured during the first update"))
        return rows
    memory, disk = optimizer_state_bytes(optimizer)
    note = f"{optim_name}" + (f", +{format_size(disk)} on disk" if disk else "")
    rows.append(("optimizer states", format_size(memory), note))
    if "step_peak" in measured:
        rows.append(("activations", format_size(max(0, measured["step_peak"] - measured["before_step"])),
                     "peak of the first update above what was held before it"))
    rows.append(("peak", format_size(measured["peak"]), "peak since training started (RSS on CPU, allocator peak "
                 "on GPU): the summary's figure"))
    return rows


def measured_components(model: nn.Module, optimizer: torch.optim.Optimizer, measured: dict[str, int],
                        device: torch.device) -> dict[str, int]:
    """The measured bytes of the components `memfit plan` predicts, by the plan's names (peak included).

    Activations are measured on a GPU only (the allocator's peak above what the update started with): on the CPU
    the resident set also grows by the weights' pages the first update touches (checkpoints load memory-mapped), so
    there the peak is the check."""
    trainable = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    out = {"weights resident": sum(_nbytes(p) for p in model.parameters() if not p.requires_grad)
           + sum(_nbytes(b) for b in model.buffers()),
           "trainable weights": trainable,
           "gradients": 0 if getattr(optimizer, "zeroth_order", False) else trainable,
           "optimizer states": optimizer_state_bytes(optimizer)[0], "peak": measured["peak"]}
    experts = getattr(model, "memfit_moe", None)
    if experts is not None:
        out["expert cache"] = experts.cache.nbytes
    if "step_peak" in measured and device.type == "cuda":
        out["activations"] = max(0, measured["step_peak"] - measured["before_step"])
    return out


def plan_rows(planned: dict[str, Any], measured: dict[str, int]) -> list[tuple[str, str, str, str]]:
    """(component, planned, measured, measured ÷ planned) for every component both have, the peak last."""
    predicted = {**planned["components"], "peak": planned["peak_bytes"]}
    rows = []
    for name, size in predicted.items():
        if name in measured:
            ratio = f"{measured[name] / size:.2f}" if size else ""
            rows.append((name, format_size(size), format_size(measured[name]), ratio))
    return rows


def print_memory_table(title: str, rows: list[tuple[str, ...]], console: Console | None = None,
                       columns: tuple[str, ...] = ("component", "size", "note")) -> None:
    """Rows under `columns`: the first left-aligned, sizes and ratios right-aligned, a note left."""
    table = Table(title=title)
    for name in columns:
        table.add_column(name, justify="left" if name in ("component", "note") else "right")
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
