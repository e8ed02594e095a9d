"""Optimizers by name, for the trainer and the CLI (`--optim`): factory(named_params, lr, weight_decay, **kw)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import partial

import torch

from memfit.errors import ConfigError
from memfit.optim.adamw8bit import AdamW8bit
from memfit.optim.apollo import Apollo, ApolloMini
from memfit.optim.galore import GaLore
from memfit.optim.mezo import MeZO
from memfit.optim.offload import OffloadAdamW

UNPROJECTED = ("embed", "wte", "wpe", "lm_head")  # embeddings and output heads keep plain Adam
NamedParams = Iterable[tuple[str, torch.nn.Parameter]]
Factory = Callable[..., torch.optim.Optimizer]


def _torch_adamw(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(named_params), lr=lr, weight_decay=weight_decay, **kw)


def _adamw8bit(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return AdamW8bit(list(named_params), lr=lr, weight_decay=weight_decay, **kw)


def _offload(offload: str, named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return OffloadAdamW(list(named_params), lr=lr, weight_decay=weight_decay, offload=offload, **kw)


def _projected(cls: Factory, named_params: NamedParams, lr: float, weight_decay: float, rank: int | None = None,
               embeddings: bool = False, **kw) -> torch.optim.Optimizer:
    """GaLore/APOLLO over a model's named parameters: 2-D weights are projected, except weights smaller than the
    rank and (unless `embeddings`) the embeddings and the output head, as in the papers; the rest, 1-D included,
    get plain Adam."""
    seen: set[int] = set()  # a tied weight listed under two names is one parameter, stepped once
    named = [(n, p) for n, p in named_params if not (id(p) in seen or seen.add(id(p)))]
    rank = rank if rank is not None else inspect.signature(cls).parameters["rank"].default
    skip = () if embeddings else UNPROJECTED
    candidates = [(n, p) for n, p in named if p.dim() == 2 and not any(s in n for s in skip)]
    fits = [(n, p) for n, p in candidates if min(p.shape) >= rank]
    if not fits:
        largest = max((min(p.shape) for _, p in candidates), default=0)
        raise ConfigError(f"no trained weight can take a rank-{rank} projection (the largest smaller dimension among "
                          f"them is {largest}): these optimizers project whole weight matrices, so train them with "
                          "--method full, or lower --proj-rank.")
    chosen = {id(p) for _, p in fits}
    rest = [p for _, p in named if id(p) not in chosen]
    groups = [{"params": [p for _, p in fits]}] + ([{"params": rest, "rank": None}] if rest else [])
    return cls(groups, lr=lr, weight_decay=weight_decay, rank=rank, names={p: n for n, p in named}, **kw)


def _mezo(named_params: NamedParams, lr: float, weight_decay: float, **kw) -> torch.optim.Optimizer:
    return MeZO([p for _, p in named_params], lr=lr, weight_decay=weight_decay, **kw)


PROJECTED = ("galore", "apollo", "apollo-mini")  # the optimizers that take rank, update_proj_gap, scale, states
OPTIMIZERS: dict[str, Factory] = {
    "adamw": _torch_adamw,
    "adamw8bit": _adamw8bit,
    "offload-cpu": partial(_offload, "cpu"),
    "offload-disk": partial(_offload, "disk"),  # needs path=<swap directory>
    "galore": partial(_projected, GaLore),  # rank, update_proj_gap, scale, states ("fp32" | "8bit")
    "apollo": partial(_projected, Apollo),  # the same, and scale_type, limiter
    "apollo-mini": partial(_projected, ApolloMini),
    "mezo": _mezo,  # zeroth order: step(closure) with forward passes only; eps, perturbations, sparsity, seed
}


def build_optimizer(name: str, named_params: NamedParams, lr: float, weight_decay: float = 0.0,
                    **kw) -> torch.optim.Optimizer:
    """Build a registered optimizer; an unknown name is a ConfigError that lists the known ones."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](named_params, lr=lr, weight_decay=weight_decay, **kw)
