"""Generic operations over any adapter method: inject, freeze, count, merge, and the adapter state.

These are free functions over the small layer contract (`AdapterLayer`) and the registry, so no method repeats
them. The injected config lives on the model as `model.memfit_config`; `model.memfit_notes` says in words what
the method chose for settings left to the model (e.g. MoS's active rank on a shallow model).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from memfit.adapters.config import AdapterConfig
from memfit.adapters.layer import AdapterLayer
from memfit.adapters.registry import get_method
from memfit.adapters.targets import find_targets, saved_modules
from memfit.errors import ConfigError
from memfit.quant import quantized_modules

SHARED_NAME = "memfit_shared"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the matching modules with `config.method`'s adapter, freeze everything else, in place."""
    if getattr(model, "memfit_config", None) is not None:
        raise ConfigError("this model already has a memfit adapter; load a fresh base model to inject another.")
    method = get_method(config.method)
    targets = find_targets(model, config, method.target_types)
    config, notes = method.resolve(config, targets) if method.resolve else (config, [])
    keep = saved_modules(model, config.modules_to_save)
    base_keys = set(model.state_dict().keys())
    for p in model.parameters():
        p.requires_grad_(False)
    shared = method.build_shared(targets, config) if method.build_shared else None
    if shared is not None:
        model.add_module(SHARED_NAME, shared.train(model.training))
    for target in targets:  # new modules take the mode of what they replace: no dropout in an eval-mode model
        _set_submodule(model, target.name, method.wrap(target, config, shared).train(target.module.training))
    for name in keep:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    if method.prepare is not None:
        method.prepare(model, targets, config)
    model.memfit_config = config
    model.memfit_notes = notes
    model.memfit_base_keys = base_keys - {k for k in base_keys if any(k.startswith(n + ".") for n in keep)}
    model.memfit_targets = [t.name for t in targets]
    return model


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Everything the adapter adds or trains: new tensors, modules_to_save, and trained base tensors.

    state: the model's state dict gathered elsewhere (e.g. the full tensors of an FSDP2-sharded model);
        defaults to `model.state_dict()`.
    """
    _require_adapter(model)
    base_keys = model.memfit_base_keys
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if k not in base_keys or k in trained}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared pools count once, a quantized base weight as its values."""
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates shared tensors
    quantized = sum(w.numel() for w in quantized_modules(model).values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's delta into its base weight (inference then costs nothing extra)."""
    for _, module in adapter_modules(_require_mergeable(model)):
        module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, module in adapter_modules(_require_mergeable(model)):
        module.unmerge()
    return model


def _require_mergeable(model: nn.Module) -> nn.Module:
    method = get_method(_require_adapter(model).memfit_config.method)
    if method.merge_error:
        raise ConfigError(f"method {method.name!r} cannot be merged: {method.merge_error}")
    return model


def _require_adapter(model: nn.Module) -> nn.Module:
    if getattr(model, "memfit_config", None) is None:
        raise ConfigError("this model has no memfit adapter; call memfit.inject(model, config) first.")
    return model
