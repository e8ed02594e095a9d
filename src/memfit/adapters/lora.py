"""LoRA: ΔW = (α/r)·B·A with A [r, in] Kaiming-uniform(a=√5) and B [out, r] zeros (Hu et al., 2021)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from memfit.adapters.config import AdapterConfig, check_dropout, check_positive
from memfit.adapters.layer import AdapterLinear, adapter_input, float_dtype, make_dropout
from memfit.adapters.method import Method, Target
from memfit.errors import ConfigError
from memfit.fields import option


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adapters on Linear layers.

    r: rank; alpha: scale numerator (ΔW is scaled by alpha / r); dropout: on the adapter input.
    rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched against the end of
        the module path (PEFT's semantics), so exports of adaptive-rank methods stay exact.
    """

    method = "lora"
    r: int = option(8, help="rank of every adapted module", flag="--rank", short="-r")
    alpha: float = option(16.0, help="scale numerator: ΔW is scaled by alpha / r", flag=True)
    dropout: float = option(0.0, help="dropout on the adapter input", flag=True)
    rank_pattern: dict[str, int] = option(factory=dict, help="per-module ranks: regex matched against the end of "
                                          "the module path -> rank (PEFT's semantics)")
    alpha_pattern: dict[str, float] = option(factory=dict, help="per-module alphas, keyed like rank_pattern")

    def validate(self) -> None:
        check_positive(self, "r", "alpha")
        check_dropout(self)
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be > 0, got {rank}.")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):  # PEFT's get_pattern_key
            return value
    return default


class LoraLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base)
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        dtype = float_dtype(base.weight)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=base.weight.device))
        self.dropout = make_dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = adapter_input(x, self.dropout, self.lora_A.dtype)
        return (h @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale


def _wrap(target: Target, config: LoraConfig, shared: nn.Module | None) -> LoraLinear:
    r, alpha = config.rank_alpha(target.name)
    return LoraLinear(target.module, r, alpha, config.dropout)


METHOD = Method("lora", LoraConfig, _wrap)
