"""Adaptive-rank machinery shared by IncreLoRA and AdaLoRA, owned by neither.

- `ImportanceEMA`: sensitivity smoothing Ī and uncertainty Ū of an importance signal (AdaLoRA §3.3), the score
  both methods rank by.
- `orthogonality`: the mean of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F over the factors, as PEFT's AdaLoRA computes it.
- `RankAllocator`: the one interface of both allocators, and `rank_allocator(model)` that builds the right one.
- `init_components`: how the first components (b·e·aᵀ) start, the papers' way or LoRA's.

Running an allocator inside memfit's trainer, and drawing where the ranks went, live in `memfit.train.allocation`:
adapters know nothing of training loops.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from memfit.adapters.layer import AdapterLinear
from memfit.adapters.model import adapter_modules
from memfit.adapters.registry import get_method, methods
from memfit.errors import ConfigError

JSONState = dict[str, Any]  # flat: str -> torch.Tensor | JSON-able value

# How the components start. "gaussian": the papers' and PEFT's, e = 0 and a, b ~ N(0, 0.02). "lora": LoRA's, b = 0,
# a Kaiming-uniform and e = 1. Both give ΔW = 0, but from e = 0 the first updates move ΔW only through e, times both
# small outer factors (0.02²), where LoRA's move it through b times a alone: under Adam the gaussian start is much
# slower on short runs (README, "On a real chat LLM").
INITS = ("gaussian", "lora")


def check_init(config: Any) -> None:
    if config.init not in INITS:
        raise ConfigError(f"{type(config).__name__}.init={config.init!r} is not a way to start the components; "
                          f"use one of {', '.join(INITS)}.")


@torch.no_grad()
def init_components(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, how: str, std: float) -> None:
    """Start components a [r, in], e [r, 1], b [out, r] in place the `how` way (INITS), std the gaussian one's."""
    if how == "lora":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        e.fill_(1.0)
        b.zero_()
        return
    nn.init.normal_(a, std=std)
    e.zero_()
    nn.init.normal_(b, std=std)


class ImportanceEMA:
    """Per-key EMAs of an importance signal I (a tensor of any shape):

        Ī ← β1·Ī + (1 − β1)·I        (sensitivity, smoothed)
        Ū ← β2·Ū + (1 − β2)·|I − Ī|  (uncertainty, against the new Ī)
        score = Ī·Ū

    The expressions keep PEFT's operation order, so scores agree bit for bit with its RankAllocator.
    """

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, ipt: torch.Tensor) -> None:
        avg = self.avg.get(key, torch.zeros_like(ipt))
        unc = self.unc.get(key, torch.zeros_like(ipt))
        avg = self.beta1 * avg + (1 - self.beta1) * ipt
        self.avg[key] = avg
        self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def score(self, key: str) -> torch.Tensor:
        return self.avg[key] * self.unc[key]

    def __contains__(self, key: str) -> bool:
        return key in self.avg

    def reset(self) -> None:
        self.avg.clear()
        self.unc.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"ema_avg.{k}": v for k, v in self.avg.items()}, **{f"ema_unc.{k}": v for k, v in self.unc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind == "ema_avg":
                self.avg[name] = value.clone()
            elif kind == "ema_unc":
                self.unc[name] = value.clone()


def orthogonality(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over all factors of ‖AAᵀ − I‖_F (A [r, in]) and ‖BᵀB − I‖_F (B [out, r]): pushes A's rows and B's
    columns towards orthonormal sets, so that E holds the singular values (AdaLoRA eq. 4)."""
    terms = []
    for a, b in factors:
        for cov in (a @ a.T, b.T @ b):  # [r, r] each
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


class RankAllocator(ABC):
    """Changes the ranks of an adaptive adapter while it trains. One allocator per training run; in any loop:

        alloc = memfit.rank_allocator(model, total_steps=T)
        for step in range(1, T + 1):
            loss = model(**batch).loss + alloc.regularization()
            loss.backward()
            optimizer.step()
            scheduler.step()                          # if there is one
            alloc.step(step, optimizer, scheduler)    # after optimizer.step(), before zero_grad()
            optimizer.zero_grad()

    `step` updates the importance scores, grows or masks ranks on schedule, and gives new parameters to the
    optimizer itself (IncreLoRA). Pass the LR scheduler when there is one: the allocator registers new parameter
    groups with it. `regularization()` is the orthogonality term to add to the loss; `add_regularization(model)`
    adds it to `outputs.loss` in training mode instead, for loops that do not expose the loss (HF Trainer).
    """

    layer_type: type[AdapterLinear]
    adds_parameters = False  # True: `step` hands new parameters to the optimizer (IncreLoRA)

    def __init__(self, model: nn.Module, config: Any, total_steps: int | None) -> None:
        if total_steps is not None and total_steps <= 0:
            raise ConfigError(f"total_steps must be > 0, got {total_steps}.")
        self.model, self.config, self.total_steps = model, config, total_steps
        self.modules: dict[str, AdapterLinear] = {n: m for n, m in adapter_modules(model)
                                                  if isinstance(m, self.layer_type)}
        if not self.modules:
            raise ConfigError(f"the model has no {self.layer_type.__name__} modules to allocate ranks to; inject "
                              f"a {type(config).__name__} first.")

    @abstractmethod
    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None) -> dict[str, Any] | None:
        """Call after the optimizer's step of update `global_step` (1-based), before zero_grad. Returns an event
        ({"step", "event", "total_rank", "ranks", ...}) when ranks changed, else None."""

    @abstractmethod
    def ranks(self) -> dict[str, int]:
        """The rank each module has now (what the allocator gave it)."""

    @abstractmethod
    def factors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(A [r, in], B [out, r]) of every module, as used in the forward, for the orthogonality term."""

    @property
    def target_total_rank(self) -> int:
        return self.config.target_rank * len(self.modules)

    def regularization(self) -> torch.Tensor:
        """orth_reg_weight × the orthogonality penalty, a differentiable scalar to add to the loss."""
        return self.config.orth_reg_weight * orthogonality(self.factors())

    def add_regularization(self, model: nn.Module) -> RemovableHandle:
        """Add `regularization()` to `outputs.loss` of every training-mode forward of `model` that computes a loss
        (as PEFT's AdaLoRA does inside its forward). Returns the hook handle; `.remove()` undoes it."""

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if module.training and isinstance(loss, torch.Tensor) and self.config.orth_reg_weight > 0:
                output["loss"] = loss + self.regularization().to(loss.dtype)
            return output

        return model.register_forward_hook(hook)

    @abstractmethod
    def finish(self) -> None:
        """End of training: settle what is still in flight (IncreLoRA drops unused reserve components)."""

    def event(self, global_step: int, kind: str, **extra: Any) -> dict[str, Any]:
        ranks = self.ranks()
        return {"step": global_step, "event": kind, "total_rank": sum(ranks.values()),
                "target_total_rank": self.target_total_rank, **extra, "ranks": ranks}

    @abstractmethod
    def state_dict(self) -> JSONState:
        """What `load_state_dict` needs to continue the schedule (importance EMAs, added parameter groups)."""

    @abstractmethod
    def load_state_dict(self, state: JSONState, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None) -> None:
        """Restore a run's allocator. The model must already carry the checkpoint's adapter (load_adapter);
        new parameter groups are rebuilt in `optimizer` (and `scheduler`) before the optimizer's state loads."""


def adaptive_methods() -> list[str]:
    return sorted(name for name, m in methods().items() if m.allocator is not None)


def rank_allocator(model: nn.Module, total_steps: int | None = None) -> RankAllocator:
    """The allocator of `model`'s adaptive adapter (IncreLoRA or AdaLoRA).

    total_steps: the number of optimizer updates of the run. AdaLoRA's budget schedule needs it; IncreLoRA needs
        it to spread its growth when `t_init`/`interval` are left to their defaults, and for the decay of new groups.
    """
    config = getattr(model, "memfit_config", None)
    if config is None:
        raise ConfigError("this model has no memfit adapter; inject an adaptive one first, e.g. "
                          "memfit.inject(model, memfit.AdaLoRAConfig(...)).")
    method = get_method(config.method)
    if method.allocator is None:
        raise ConfigError(f"the model's {config.method!r} adapter has fixed ranks, so there is nothing to allocate; "
                          f"rank_allocator needs an adaptive method: {adaptive_methods()}.")
    return method.allocator(model, config, total_steps)
