"""AdaLoRA (Zhang et al., ICLR 2023): start every module at `init_rank`, prune singular values to a budget.

ΔW = P·Λ·Q is stored as B [out, r], E [r, 1], A [r, in]: ΔW = B·(A ⊙ E)·α/init_rank, with A, B ~ N(0, 0.02) and
E = 0. Importance of every entry w is s = Ī·Ū of |w·∂L/∂w|; triplet i scores S_i = s(E_i) + mean_j s(A_ij) +
mean_j s(B_ji), and the E with the lowest scores over the whole model are zeroed down to the budget b(t):

    b(t) = b0                                                        t ≤ t_init
    b(t) = b_T + (b0 − b_T)·(1 − (t − t_init)/(T − t_init − t_final))³  in between, masking every `interval` steps
    b(t) = b_T                                                       t > T − t_final (masks then stay fixed)

This follows PEFT's `RankAllocator.update_and_allocate` step for step (tests/test_adalora.py checks it against
PEFT): masked E keep training between mask events, as in PEFT, and are re-zeroed at every step of the final phase.
Export writes each module as a plain LoRA of its unmasked triplets: A′ = diag(E)·A, B′ = B, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.adapters.adaptive import ImportanceEMA, JSONState, RankAllocator, check_init, init_components
from memfit.adapters.config import AdapterConfig, check_dropout, check_positive
from memfit.adapters.layer import AdapterLinear, adapter_input, float_dtype, make_dropout
from memfit.adapters.method import Method, Target
from memfit.errors import ConfigError
from memfit.fields import option

INIT_STD = 0.02  # A and B ~ N(0, 0.02), as in the paper's code and PEFT
T_INIT_SHARE, T_FINAL_SHARE = 0.1, 0.3  # defaults of t_init and t_final, as shares of the run


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA. Ranks, α, betas and the regulariser weight default to PEFT's AdaLoraConfig (PEFT's names: init_r,
    target_r, tinit, tfinal, deltaT). α/init_rank is a constant: masking does not rescale the surviving triplets."""

    method = "adalora"
    init_rank: int = option(12, help="triplets per module at the start", flag=True)
    target_rank: int = option(8, help="average rank at the end: the budget is target_rank x modules", flag=True)
    alpha: float = option(8.0, help="ΔW is scaled by alpha / init_rank", flag=True)
    dropout: float = option(0.0, help="dropout on the adapter input", flag=True)
    t_init: int | None = option(None, help=f"updates before pruning starts; None: {T_INIT_SHARE:.0%} of the run",
                                flag=True)
    t_final: int | None = option(None, help=f"last updates at the final budget, masks fixed; None: "
                                 f"{T_FINAL_SHARE:.0%} of the run", flag=True)
    interval: int = option(10, help="updates between mask events while the budget falls", flag=True)
    beta1: float = option(0.85, help="EMA factor of the sensitivity")
    beta2: float = option(0.85, help="EMA factor of the uncertainty")
    orth_reg_weight: float = option(0.5, help="weight of the orthogonality regulariser")
    init: str = option("gaussian", help="how the triplets start: gaussian (the paper's and PEFT's: E = 0, A, B ~ "
                       "N(0, 0.02)) or lora (LoRA's: B = 0, A Kaiming, E = 1; faster on short runs)", flag=True)

    def validate(self) -> None:
        check_positive(self, "init_rank", "target_rank", "alpha", "interval")
        check_dropout(self)
        check_init(self)
        if self.target_rank > self.init_rank:
            raise ConfigError(f"AdaLoRAConfig.target_rank={self.target_rank} > init_rank={self.init_rank}: AdaLoRA "
                              "only prunes. Raise init_rank, or use IncreLoRAConfig to grow ranks.")
        for name in ("t_init", "t_final"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"AdaLoRAConfig.{name} must be >= 0 (or None for the default), "
                                  f"got {getattr(self, name)}.")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"AdaLoRAConfig.{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoRAConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(t_init, t_final) for a run of `total_steps` updates, checked to leave a pruning phase."""
        t_init = round(T_INIT_SHARE * total_steps) if self.t_init is None else self.t_init
        t_final = round(T_FINAL_SHARE * total_steps) if self.t_final is None else self.t_final
        if t_init + t_final >= total_steps:
            raise ConfigError(f"AdaLoRA: t_init ({t_init}) + t_final ({t_final}) >= total steps ({total_steps}) "
                              "leaves no steps to prune ranks in; lower t_init/t_final or train for more steps.")
        return t_init, t_final


class AdaLoRALinear(AdapterLinear):
    """A Linear plus B·(A ⊙ E)·α/init_rank; `rank_mask` [init_rank] marks the triplets the allocator kept."""

    def __init__(self, base: nn.Linear, config: AdaLoRAConfig) -> None:
        super().__init__(base)
        r, device = config.init_rank, base.weight.device
        dtype = float_dtype(base.weight)
        self.init_rank, self.scale = r, config.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_E = nn.Parameter(torch.empty(r, 1, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        init_components(self.lora_A, self.lora_E, self.lora_B, config.init, INIT_STD)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))
        self.dropout = make_dropout(config.dropout)

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = adapter_input(x, self.dropout, self.lora_A.dtype)
        return (h @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        # Triplets with E = 0 add nothing, so leaving them out is exact; masked ones are 0 after every final-phase
        # step, so a trained adapter exports at the rank the allocator gave it.
        keep = self.lora_E.detach().view(-1) != 0
        return (self.lora_A * self.lora_E)[keep], self.lora_B[:, keep], self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_rank={self.init_rank}"


class AdaLoRAAllocator(RankAllocator):
    """PEFT's RankAllocator: importance EMAs of every entry, cubic budget, global top-k of triplet scores."""

    layer_type = AdaLoRALinear

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, total_steps: int | None) -> None:
        if total_steps is None:
            raise ConfigError("AdaLoRA's budget schedule needs the length of the run: "
                              "memfit.rank_allocator(model, total_steps=<number of optimizer updates>).")
        super().__init__(model, config, total_steps)
        self.t_init, self.t_final = config.schedule(total_steps)
        self.init_total_rank = sum(m.init_rank for m in self.modules.values())
        self.ema = ImportanceEMA(config.beta1, config.beta2)

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether `step` is a mask event), as PEFT's budget_schedule."""
        total, t_init, t_final = self.total_steps, self.t_init, self.t_final
        if step <= t_init:
            return self.init_total_rank, False
        if step > total - t_final:
            return self.target_total_rank, True
        fraction = 1 - (step - t_init) / (total - t_final - t_init)
        budget = int((self.init_total_rank - self.target_total_rank) * (fraction ** 3) + self.target_total_rank)
        return budget, step % self.config.interval == 0

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None) -> dict[str, Any] | None:
        final_start = self.total_steps - self.t_final
        if global_step < final_start:
            self._update_importance()
            budget, mask_now = self.budget(global_step)
            return self._mask_to(budget, global_step) if mask_now else None
        if global_step == final_start:  # the last allocation: the final budget, then masks stay fixed
            event = self._mask_to(self.target_total_rank, global_step)
            self.ema.reset()
            return event
        self._apply_masks()
        return None

    @torch.no_grad()
    def _update_importance(self) -> None:
        for name, layer in self.modules.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, part)
                if p.grad is not None:
                    self.ema.update(f"{name}.{part}", (p * p.grad).abs())

    def _entry_score(self, name: str, part: str) -> torch.Tensor:
        key = f"{name}.{part}"
        return self.ema.score(key) if key in self.ema else torch.zeros_like(getattr(self.modules[name], part))

    def triplet_scores(self, name: str) -> torch.Tensor:
        """S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji) for the triplets of module `name`, [init_rank]."""
        a = self._entry_score(name, "lora_A").mean(dim=1, keepdim=True)  # [r, 1]
        b = self._entry_score(name, "lora_B").mean(dim=0).view(-1, 1)  # [r, 1]
        return self._entry_score(name, "lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    @torch.no_grad()
    def _mask_to(self, budget: int, global_step: int) -> dict[str, Any]:
        scores = {name: self.triplet_scores(name) for name in self.modules}
        k = self.init_total_rank - budget
        # Everything at or below the k-th smallest score goes (ties included, as in PEFT); k = 0 masks nothing.
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -float("inf")
        for name, layer in self.modules.items():
            keep = ~(scores[name] <= threshold)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            layer.rank_mask.copy_(keep)
        return self.event(global_step, "mask", budget=budget)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for layer in self.modules.values():
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.modules.items()}

    def factors(self):
        for layer in self.modules.values():
            yield layer.lora_A, layer.lora_B

    def finish(self) -> None:
        """Nothing is in flight: the final phase re-applies the masks after every update."""

    def state_dict(self) -> JSONState:
        return self.ema.state_dict()

    def load_state_dict(self, state: JSONState, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None) -> None:
        self.ema.load_state_dict(state)


def _wrap(target: Target, config: AdaLoRAConfig, shared: nn.Module | None) -> AdaLoRALinear:
    return AdaLoRALinear(target.module, config)


METHOD = Method("adalora", AdaLoRAConfig, _wrap, allocator=AdaLoRAAllocator)
