"""The contract between a method file and the generic operations: what a method provides, and what it is given.

A method file defines a config class, its module classes, and one `METHOD = Method(...)`; the explicit list in
`memfit.adapters.registry` names the file. Generic code (inject, save, merge, export, the trainer, the CLI)
only ever sees this dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from memfit.adapters.config import AdapterConfig


@dataclass(frozen=True)
class Target:
    """One module chosen for adaptation, with its place among the modules of the same kind."""

    name: str  # dotted path in the model
    module: nn.Module
    kind: str  # projection type: the last path component ("q_proj", "query", ...)
    layer: int  # index among the targets of this kind, in model order
    num_layers: int  # number of targets of this kind


@dataclass(frozen=True)
class Method:
    """How a method turns targets into modules.

    wrap(target, config, shared) -> nn.Module: the replacement for `target.module`.
    build_shared(targets, config) -> nn.Module | None: state shared across layers (shard pools, slow weights),
        registered once on the model as `memfit_shared`.
    resolve(config, targets) -> (config, notes): fills the settings a config leaves to the model (e.g. MoS's active
        rank, which a pool of a shallow model cannot hold at the paper's default) before anything is built; the
        resolved config is what is saved, the notes say in words what was chosen and why.
    target_types: module classes the method can wrap (nn.Linear for LoRA-like methods).
    allocator(model, config, total_steps) -> RankAllocator: adaptive-rank methods only; `memfit.rank_allocator(model)`
        builds it, and memfit's trainer runs it whenever a method has one.
    prepare(model, targets, config): model-level setup after wrapping, for methods that train base tensors
        (DiffFit's biases and norms) or add parameters outside the targets.
    merge_error: why `merge()` is impossible for this method (nonlinear adapters, compressed weights); None when the
        method merges.
    from_scratch: the method compresses a model trained from the start (`memfit train`), rather than adapting a
        pretrained one (`memfit finetune`).
    report(model) -> dict: method-specific facts for a run's summary (STABLE-RPS: the bytes of z against the dense
        weights it stands for).
    """

    name: str
    config_cls: type[AdapterConfig]
    wrap: Callable[[Target, Any, nn.Module | None], nn.Module]
    build_shared: Callable[[list[Target], Any], nn.Module | None] | None = None
    resolve: Callable[[Any, list[Target]], tuple[Any, list[str]]] | None = None
    target_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    allocator: Callable[[nn.Module, Any, int | None], Any] | None = None
    prepare: Callable[[nn.Module, list[Target], Any], None] | None = None
    merge_error: str | None = None
    from_scratch: bool = False
    report: Callable[[nn.Module], dict[str, Any]] | None = None
