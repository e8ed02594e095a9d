"""The layer contract: an adapted Linear keeps the base `weight`/`bias` under their own names.

The base weight may be a quantized one (`memfit.quant.QuantWeight`): the base forward goes through
`memfit.quant.linear`, and the adapter's tensors are fp32 (`float_dtype`).

Subclassing nn.Linear and adopting the base parameters (as torchtune's LoRALinear does) keeps every
base checkpoint key unchanged, so the frozen weights load, stream or shard exactly as before.

`AdapterLayer` is the general contract (the output is any function of the input and the base output:
DiffFit's per-channel scale, Compacter's bottleneck); `AdapterLinear` is the additive special case
y = base(x) + delta(x) that LoRA-family methods share, with merge/unmerge implemented once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.quant import QuantWeight, linear


class AdapterLayer(nn.Linear, ABC):
    """y = adapt(x, base(x)) unless merged or disabled. Subclasses implement `adapt`, `merge`, `unmerge`."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.merged = False
        self.disabled = False

    @abstractmethod
    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the layer input `x` and the base output `y`."""

    @abstractmethod
    def merge(self) -> None:
        """Fold the adapter into `weight`/`bias` so that inference costs nothing extra."""

    @abstractmethod
    def unmerge(self) -> None:
        """Undo `merge` (up to float rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # a plain or quantized (memfit.quant) base weight
        if self.merged or self.disabled:
            return y
        return self.adapt(x, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


class AdapterLinear(AdapterLayer):
    """y = base(x) + delta(x). Subclasses implement `adapter_forward` and `delta_weight`.

    LoRA-family subclasses also implement `lora_factors()` -> (A [r, in], B [out, r], scale) so that
    export to the PEFT LoRA format is exact and generic.
    """

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """delta(x), computed without materialising the dense update."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The dense [out, in] update this adapter adds to `weight`."""

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.weight, QuantWeight):
            raise ConfigError("cannot fold an adapter into a quantized base weight (the sum is not representable in "
                              f"{self.weight.kind}); dequantize the model first (memfit.quant.dequantize), or "
                              "`memfit merge`, which does.")
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype new adapter tensors take beside base weight `t`: its own if floating, else fp32 (quantized bases)."""
    return t.dtype if t.is_floating_point() else torch.float32


def make_dropout(p: float) -> nn.Module:
    """Dropout on the adapter input, or the identity when p = 0 (no RNG draw, no mask kept for backward)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def adapter_input(x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Dropout on the adapter's input, cast to the adapter's dtype (fp32 adapters on a bf16 base)."""
    return dropout(x.to(dtype))
