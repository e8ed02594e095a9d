"""Compacter (Karimi Mahabadi et al., NeurIPS 2021): bottleneck adapters built from PHM layers.

After a block's attention and/or MLP output h: h ← h + U(GELU(D(h))), D: d → k, U: k → d, k = d / reduction.
D and U are parameterised hypercomplex multiplication (PHM) layers

    W = Σ_{i=1..n} A_i ⊗ (s_i·t_iᵀ),   A_i [n, n],  s_i [in/n],  t_i [out/n]

with the "slow" weights A [n, n, n] shared by every adapter layer of the model (one tensor, owned by
the model as `memfit_shared`, saved once) and rank-1 "fast" weights (s, t) per layer. A model with
PHM layers ℓ has n³ + Σ_ℓ (in_ℓ + out_ℓ) trainable parameters. Compacter++ is placement=["mlp"].

The bottleneck is nonlinear, so Compacter cannot be merged into the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.adapters.config import check_positive
from memfit.adapters.layer import AdapterLayer, float_dtype
from memfit.adapters.method import Method, Target
from memfit.adapters.placement import BlockOutputConfig
from memfit.errors import ConfigError
from memfit.fields import option

MERGE_ERROR = (
    "its GELU bottleneck is nonlinear, so it cannot be folded into the base weights. Keep the adapter "
    "unmerged (the bottleneck is small), or use LoRA or DiffFit where inference must cost nothing extra."
)


@dataclass
class CompacterConfig(BlockOutputConfig):
    """Compacter. placement=["attention", "mlp"] is Compacter; placement=["mlp"] is Compacter++."""

    method = "compacter"
    n: int = option(4, help="number of Kronecker summands (n must divide the width d and the bottleneck k)")
    reduction: int = option(32, help="bottleneck k = d // reduction")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "n", "reduction")


class PHMRule(nn.Module):
    """The shared slow weights A [n, n, n] (A_i = A[i]).

    Initialised N(0, 1/n): with fast weights of variance 1/√in each, W then has variance 1/in, the
    scale of a Kaiming-initialised Linear.
    """

    def __init__(self, n: int, like: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(n, n, n, device=like.device).to(float_dtype(like)) / math.sqrt(n))


class PHM(nn.Module):
    """One PHM layer's fast weights s [n, in/n], t [n, out/n]; the slow weights come from the shared rule.

    `zero_out=True` starts t at zero, so W = 0 and the adapter starts as the identity (like LoRA's B = 0).
    """

    def __init__(self, in_features: int, out_features: int, n: int, like: torch.Tensor, zero_out: bool) -> None:
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        std = in_features ** -0.25
        dtype = float_dtype(like)
        self.s = nn.Parameter((torch.randn(n, in_features // n, device=like.device) * std).to(dtype))
        t = torch.zeros(n, out_features // n) if zero_out else torch.randn(n, out_features // n) * std
        self.t = nn.Parameter(t.to(device=like.device, dtype=dtype))

    def forward(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """x·W without building W: y[b, q] = Σ_i Σ_a (Σ_p x[a, p]·s_i[p])·A_i[a, b]·t_i[q]."""
        xr = x.reshape(*x.shape[:-1], self.n, self.in_features // self.n)  # [..., n(a), in/n(p)]
        u = torch.einsum("...ap,ip->...ia", xr, self.s)  # [..., n(i), n(a)]
        v = torch.einsum("...ia,iab->...ib", u, A)  # [..., n(i), n(b)]
        y = torch.einsum("...ib,iq->...bq", v, self.t)  # [..., n(b), out/n(q)]
        return y.reshape(*x.shape[:-1], self.out_features)


class CompacterLinear(AdapterLayer):
    """A block output projection followed by its Compacter bottleneck: y ← y + U(GELU(D(y)))."""

    def __init__(self, base: nn.Linear, n: int, k: int, rule: PHMRule) -> None:
        super().__init__(base)
        d = self.out_features
        self._rule = (rule,)  # a tuple hides the shared module from this module's children
        self.adapter_down = PHM(d, k, n, base.weight, zero_out=False)
        self.adapter_up = PHM(k, d, n, base.weight, zero_out=True)

    @property
    def rule(self) -> PHMRule:
        return self._rule[0]

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A = self.rule.A
        h = F.gelu(self.adapter_down(y.to(A.dtype), A))
        return y + self.adapter_up(h, A).to(y.dtype)

    def merge(self) -> None:
        raise ConfigError(f"Compacter cannot be merged: {MERGE_ERROR}")

    def unmerge(self) -> None:
        raise ConfigError(f"Compacter cannot be merged: {MERGE_ERROR}")


def bottleneck(target: Target, config: CompacterConfig) -> int:
    """k = d // reduction for the block output `target`, checked against n."""
    d, n = target.module.out_features, config.n
    k = d // config.reduction
    if k < 1:
        raise ConfigError(
            f"Compacter: {target.name!r} has width d={d}, so reduction={config.reduction} leaves no bottleneck "
            f"(k = d // reduction = 0); choose reduction <= {d}."
        )
    if d % n or k % n:
        divisors = [i for i in range(1, min(d, k) + 1) if d % i == 0 and k % i == 0]
        raise ConfigError(
            f"Compacter: n={n} must divide both the width d={d} of {target.name!r} and its bottleneck "
            f"k = d // reduction({config.reduction}) = {k}; choose n among {divisors} or change reduction."
        )
    return k


def _build_rule(targets: list[Target], config: CompacterConfig) -> PHMRule:
    for target in targets:
        bottleneck(target, config)
    return PHMRule(config.n, targets[0].module.weight)


def _wrap(target: Target, config: CompacterConfig, rule: nn.Module | None) -> CompacterLinear:
    assert isinstance(rule, PHMRule)
    return CompacterLinear(target.module, config.n, bottleneck(target, config), rule)


METHOD = Method("compacter", CompacterConfig, _wrap, build_shared=_build_rule, merge_error=MERGE_ERROR)
