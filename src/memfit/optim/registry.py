"""Optimizers by name, for the trainer and the CLI (`--optim`): factory(named_params, lr, weight_decay, **kw)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch

from memfit.errors import ConfigError
from memfit.optim.adamw8bit import AdamW8bit
from memfit.optim.mezo import MeZO
from memfit.optim.offload import OffloadAdamW

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]
Factory = Callable[..., torch.optim.Optimizer]


def _torch_adamw(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(named_params), lr=lr, weight_decay=weight_decay, **kw)


def _adamw8bit(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return AdamW8bit(list(named_params), lr=lr, weight_decay=weight_decay, **kw)


def _offload(offload: str, named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return OffloadAdamW(list(named_params), lr=lr, weight_decay=weight_decay, offload=offload, **kw)


def _mezo(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return MeZO([p for _, p in named_params], lr=lr, weight_decay=weight_decay, **kw)


OPTIMIZERS: dict[str, Factory] = {
    "adamw": _torch_adamw,
    "adamw8bit": _adamw8bit,
    "offload-cpu": partial(_offload, "cpu"),
    "offload-disk": partial(_offload, "disk"),  # needs path=<swap directory>
    "mezo": _mezo,  # zeroth order: step(closure) with forward passes only; eps, perturbations, sparsity, seed
}


def build_optimizer(name: str, named_params: NamedParams, lr: float, weight_decay: float = 0.0,
                    **kw) -> torch.optim.Optimizer:
    """Build a registered optimizer; an unknown name is a ConfigError that lists the known ones."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](named_params, lr=lr, weight_decay=weight_decay, **kw)
