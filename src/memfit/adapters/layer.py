"""The layer contract: an adapted Linear keeps the base `weight`/`bias` under their own names.

Subclassing nn.Linear and adopting the base parameters (as torchtune's LoRALinear does) keeps every
base checkpoint key unchanged, so the frozen weights load, stream or shard exactly as before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


class AdapterLinear(nn.Linear, ABC):
    """y = base(x) + delta(x). Subclasses implement `adapter_forward` and `delta_weight`.

    LoRA-family subclasses also implement `lora_factors()` -> (A [r, in], B [out, r], scale) so that
    export to the PEFT LoRA format is exact and generic.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.merged = False
        self.disabled = False

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """delta(x), computed without materialising the dense update."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The dense [out, in] update this adapter adds to `weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def adapter_input(x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Dropout on the adapter's input, cast to the adapter's dtype (fp32 adapters on a bf16 base)."""
    return dropout(x.to(dtype))
