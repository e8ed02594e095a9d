"""The memory plan of a fine-tune: every component of its peak, predicted without reading a weight.

The model is built from its config under `FakeTensorMode` (shapes, dtypes and devices, no storage), the adapter
injected and the optimizer built exactly as the run would, and one whole update is traced with `LiveBytes`:
forward, loss, backward, gradient clipping and the optimizer's step. So activations, gradients and optimizer
states are the bytes the run's own code allocates for this architecture, batch and length (attention
implementation, chunked loss, checkpointing included), not a formula that drifts from the code. What the trace
cannot see is the runtime itself; on the CPU that is this process's resident set after memfit's imports, measured
here (`overhead`), and the allocator's retention of freed memory, which `--lean-allocator` removes
(`memfit.tiers.memory.lean_allocator`; see `ALLOCATOR_NOTE`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit import quant
from memfit.adapters import AdapterConfig, get_method, inject
from memfit.errors import ConfigError
from memfit.local import is_gguf, load_config, load_tokenizer
from memfit.local import model_dir as local_dir
from memfit.moe.arch import ARCHS
from memfit.plan.components import Component, Plan
from memfit.plan.offload import plan_offload, resident
from memfit.plan.trace import LiveBytes
from memfit.quant.checkpoint import empty_quantized, is_quantized_dir
from memfit.quant.codebooks import CODEBOOKS, dynamic_map
from memfit.quant.experts import fused_experts
from memfit.tiers.memory import rss_bytes, storage_bytes
from memfit.tiers.modules import suffix_keys
from memfit.train.config import TrainConfig
from memfit.train.finetune import auto_class, missing_modules
from memfit.train.memory import PLANNED_STATE
from memfit.train.tasks import TASKS, Task
from memfit.train.trainer import make_optimizer

# Flags whose memory terms the planner does not model yet: a plan that ignored them would be wrong, so it refuses.
UNCOVERED = {"shard": "--shard"}
# What offloading adds to the memory held through a step (`memfit.plan.offload`).
OFFLOADED = ("stream buffers", "expert cache", "expert reads")
ALLOCATOR_NOTE = ("on the CPU the measured peak is the resident set, and glibc keeps freed activation memory in its "
                  "heap: runs measured 3-41% above these live bytes (bench/plan.py); --lean-allocator returns it at "
                  "once, and the run then measures what is predicted here")


def _batch(task: Task, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A full batch of `length` tokens, every position a target, with one padded position: a batch of rows of
    several lengths takes the attention mask's path (traced on fake tensors, the models take it always)."""
    ids = torch.zeros((batch, length), dtype=torch.long, device=device)
    labels = torch.zeros((batch,), dtype=torch.long, device=device) if task.name == "classify" else ids.clone()
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_finetune(model_dir: str | os.PathLike, adapter: AdapterConfig, train: TrainConfig | None = None,
                  task: str = "causal-lm", labels: list[str] | None = None, device: str | None = None,
                  runtime: int | None = None) -> Plan:
    """Predict the peak memory of `memfit finetune` with these settings, component by component (no weight read).

    labels: the class names of a classification run (their count sizes the head); `device` as the run takes it.
    runtime: the runtime's resident bytes, when measured already (a search plans several times in one process,
        whose resident set grows with each trace); by default this process's resident set with the model's
        tokenizer loaded. Plan in a fresh process (`plan_isolated`) for a run in this one: tracing leaves ~30 MB.
    """
    train = train or TrainConfig()
    for key, flag in UNCOVERED.items():
        if getattr(train, key) not in (None, False):
            raise ConfigError(f"memfit plan does not model {flag} yet; plan the run without it (an upper bound on "
                              "its weights) or measure it with memfit finetune.")
    method = get_method(adapter.method)
    if method.from_scratch:
        raise ConfigError(f"memfit plan covers adapters on pretrained models; {adapter.method} trains from scratch.")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
    root = local_dir(model_dir, weights=False)
    dev = run_device(train, device)
    _check_offload(train, task, dev)
    task_obj = TASKS[task](labels or (["0", "1"] if task == "classify" else None))
    config = load_config(root, **task_obj.model_kwargs())
    cls = auto_class(task_obj)
    overhead = runtime_bytes(root, dev, runtime, run_imports(adapter))
    model, new, mode = fake_base(root, cls, config, dev, train.quantize, pad_token=task == "classify")
    with mode, torch.device(dev):
        streamed, offloaded = plan_offload(model, root, train.weights_budget, train.expert_budget, training=True)
        if new and not adapter.modules_to_save:
            adapter = replace(adapter, modules_to_save=new)
        inject(model, adapter)
        weights = resident([t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad], streamed)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the adapter leaves no parameter to train; check --targets.")
        trainable = [p for _, p in named]
        optimizer = make_optimizer(train, named, Path(os.devnull))
        components, notes = _trace_update(model, task_obj, train, optimizer, trainable, dev)
    held = [Component("weights resident", storage_bytes(weights), weights_note(model)),
            Component("trainable weights", storage_bytes(trainable),
                      f"{sum(p.numel() for p in trainable):,} parameters")]
    imported = "".join(f", {name}" for name in run_imports(adapter))
    runtime = [Component("runtime", overhead, "this process's resident set before the model: interpreter, torch, "
                         f"transformers, memfit, the tokenizer{imported}")] if dev.type == "cpu" else []
    if dev.type == "cpu" and not train.lean_allocator:
        notes.append(ALLOCATOR_NOTE)
    parts = runtime + held + offloaded + components
    return Plan(parts, peak_of({c.name: c.bytes for c in parts}), str(dev), notes)


def run_device(train: TrainConfig, device: str | None = None) -> torch.device:
    """The device `memfit finetune` runs on: `device`, else the CPU for offloaded experts (their cache is in host
    RAM), else cuda where there is one."""
    return torch.device(device or ("cpu" if train.expert_budget is not None or not torch.cuda.is_available()
                                   else "cuda"))


def _check_offload(train: TrainConfig, task: str, dev: torch.device) -> None:
    """What `memfit finetune` refuses of --expert-budget (`train.finetune.load_base`; `TrainConfig` itself refuses
    the flags it does not combine with), refused here before a fake model is built."""
    if train.expert_budget is not None and (task != "causal-lm" or dev.type != "cpu"):
        raise ConfigError("--expert-budget fine-tunes causal language models on the CPU (its cache is in host RAM); "
                          "plan it with --device cpu, without --task classify.")


def run_imports(adapter: AdapterConfig | None) -> tuple[str, ...]:
    """Modules the run imports while it injects `adapter` and that the planner's own process would not count:
    PEFT's table of default targets (with what it pulls in, ~57 MB here) when no --targets are given and the
    method has no default of its own."""
    default = adapter is not None and adapter.target_modules is None
    return ("peft.utils.constants",) if default and type(adapter).default_targets is AdapterConfig.default_targets \
        else ()


def runtime_bytes(root: str | os.PathLike, dev: torch.device, runtime: int | None = None,
                  imports: tuple[str, ...] = ()) -> int:
    """The runtime's resident bytes on the CPU (0 elsewhere): `runtime` when measured already, else this process's
    resident set with the model's tokenizer loaded and `imports` imported (the interpreter, torch, transformers,
    memfit, the tokenizer every run loads before its model, and what injecting the adapter imports: `run_imports`),
    measured before anything is built."""
    if dev.type != "cpu":
        return 0
    if runtime is not None:
        return runtime
    for name in imports:
        importlib.import_module(name)
    tokenizer = load_tokenizer(root)
    size = rss_bytes()
    del tokenizer
    return size


def fake_base(root: Path, cls: Any, config: Any, dev: torch.device, quantize: str | None,
              pad_token: bool = False) -> tuple[nn.Module, list[str], FakeTensorMode]:
    """(model, modules the checkpoint lacks, its FakeTensorMode): the frozen base as `memfit finetune`,
    `generate` and `serve` load it (fp32, quantized at load, or a `memfit quantize` checkpoint), on fake tensors.
    Re-enter the mode to run it."""
    for codebook in (*CODEBOOKS.values(), lambda: dynamic_map(True)):  # cached real tensors, never fake ones
        codebook()
    quantized_dir = is_quantized_dir(root)
    shell = empty_quantized(cls, root, config) if quantized_dir else None  # meta tensors, no storage
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.device(dev):
        model = _fake_copy(shell, dev) if shell is not None else cls.from_config(config, dtype=torch.float32)
        if pad_token:
            model.config.pad_token_id = 0
        # Fused experts are stored per expert on disk and some routers under older names (transformers converts
        # both as it loads): neither is a fresh head.
        fused = {f"{n}." for n, m in model.named_modules() if fused_experts(m)}
        names = [n for n, _ in model.named_parameters() if not any(n.startswith(f) for f in fused)]
        arch = ARCHS.get(getattr(config, "model_type", ""))
        keys_for = suffix_keys if arch is None else (lambda ns: (k for n in ns for k in arch.disk_names(n)))
        new = [] if is_gguf(root) else missing_modules(root, names, keys_for)
        if quantize is not None and not quantized_dir:  # as the loaders quantize: the frozen Linears
            quant.quantize(model, quant.QuantConfig(kind=quantize, skip=[*quant.HEADS, *new]))
    return model, new, mode


def weights_note(model: nn.Module) -> str:
    quantized = quant.quantized_modules(model)
    kinds = "/".join(sorted({w.kind for w in quantized.values()}))
    return "frozen base weights and buffers" + (f", {len(quantized)} of them {kinds}" if quantized else ", fp32")


def _fake_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    """`model`'s meta tensors as fake ones, tied parameters still tied (to_empty gives each holder its own)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in first:
                ties.append((module, name, first[id(p)]))
            else:
                first[id(p)] = (module, name)
    model.to_empty(device=dev)
    for module, name, (owner, owner_name) in ties:
        setattr(module, name, getattr(owner, owner_name))
    return model


def peak_of(parts: dict[str, int]) -> int:
    """The peak components add up to: what is held (runtime, weights, and the optimizer's states, which persist
    from the first step on, so every later update's forward and backward runs beside them, and what offloading
    holds: the stream's buffers, the expert cache and its staging), plus the gradients and
    the larger of the backward's activations and the optimizer step's temporaries."""
    get = lambda name: parts.get(name, 0)  # noqa: E731
    held = get("runtime") + get("weights resident") + get("trainable weights") + get("optimizer states") + sum(
        get(name) for name in OFFLOADED)
    return held + get("gradients") + max(get("activations"), get("optimizer step"))


def _trace_update(model: nn.Module, task: Task, train: TrainConfig, optimizer: torch.optim.Optimizer,
                  trainable: list[torch.Tensor], dev: torch.device) -> tuple[list[Component], list[str]]:
    """(components, notes) of one traced update."""
    held = list(model.parameters()) + list(model.buffers())
    batch = _batch(task, train.batch_size, train.max_length, dev)
    model.train()
    notes: list[str] = []
    grad_bytes = 0 if getattr(optimizer, "zeroth_order", False) else storage_bytes(trainable)
    with LiveBytes(held) as live:
        if getattr(optimizer, "zeroth_order", False):  # two forward passes, nothing saved for a backward
            with torch.no_grad():
                task.loss_sum(model, batch)
            activations = live.peak
            states, step_extra, how = 0, 0, "none"
            notes.append("zeroth order: forward passes only, no gradients or optimizer states")
        else:
            loss = task.loss_sum(model, batch)
            loss.backward()
            del loss
            backward_peak = live.peak
            activations = max(0, backward_peak - grad_bytes)
            before = live.mark()
            if train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
            states, step_extra, how = _step_states(optimizer, train.optim, trainable, live, before, dev)
    components = [Component("gradients", grad_bytes, "one per trainable weight"),
                  Component("optimizer states", states, f"{train.optim} ({how})"),
                  Component("activations", activations, f"batch {train.batch_size} x {train.max_length} tokens, "
                            "peak of the forward and backward above the gradients")]
    if step_extra:
        components.append(Component("optimizer step", step_extra, "the step's temporaries beside its states"))
    return components, notes


# Optimizers whose step is plain torch ops, traced on fake tensors; the others run native kernels or move states
# off the device, and are planned from their bytes per parameter (`PLANNED_STATE`).
TRACED_STEPS = ("adamw", "galore", "apollo", "apollo-mini")


def _step_states(optimizer: torch.optim.Optimizer, name: str, trainable: list[torch.Tensor], live: LiveBytes,
                 before: int, dev: torch.device) -> tuple[int, int, str]:
    """(state bytes, the step's transient bytes above them, how they were found)."""
    if name in TRACED_STEPS:
        optimizer.step()
        states = max(0, live.current - before)
        return states, max(0, live.peak - before - states), "traced"
    per_param, where = PLANNED_STATE.get(name, (8.0, "memory"))
    if hasattr(optimizer, "planned_state_bytes"):
        per_param = optimizer.planned_state_bytes() / max(1, sum(p.numel() for p in trainable))
    here = where == "memory" or (where == "host RAM" and dev.type == "cpu")
    return (int(per_param * sum(p.numel() for p in trainable)) if here else 0), 0, f"{per_param:.3g} B/param" + (
        "" if here else f", in {where}")
