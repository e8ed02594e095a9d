"""MoS, Mixture of Shards (Wang et al., ICLR 2025): LoRA factors assembled from global shard pools.

For each projection kind τ (q, k, v, ...) one pool pair is shared by all L layers:
P_A [N, d_in/l], P_B [N, d_out/l] with N = r_eq·L·l, so the trainable parameters equal a rank-r_eq
LoRA on every layer while each layer uses an active rank r > r_eq. Four differentiation strategies
keep layers from collapsing onto the same shards; each can be switched off for ablations:

- subset selection: each layer draws its own random subset of public shards;
- pair dissociation: the A and B index vectors are drawn independently;
- vector sharding: a rank vector is the concatenation of l shards (l = 1 switches it off);
- shard privatization: layer i owns r_pri·l shards no other layer touches (r_pri = 0 switches it off).

The "routing" is a fixed seeded index per module, saved with the adapter as a buffer.

The paper's defaults (r=16, r_eq=4, r_pri=2, l=4) assume 32 layers: a kind's public pool holds
(r_eq − r_pri)·L rank vectors and each layer picks r − r_pri of them, so a 6-layer model cannot hold r=16.
Left unset (None), r and l are derived from the model when the adapter is built (r: 16, lowered to what the
pools hold; l: 4, or the largest of 2, 1 that divides every dimension), and the run says what was chosen; a value
set explicitly that cannot work stays an error.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from memfit.adapters.config import AdapterConfig, check_dropout, check_positive
from memfit.adapters.layer import AdapterLinear, adapter_input, float_dtype, make_dropout
from memfit.adapters.method import Method, Target
from memfit.errors import ConfigError
from memfit.fields import option

PAPER_R, PAPER_SHARDS = 16, 4


@dataclass
class MoSConfig(AdapterConfig):
    """Mixture of Shards. Defaults are the paper's (r=16, r_eq=4, r_pri=2, l=4, α=16, dropout 0.1), with r and l
    derived from the model when left unset (see the module docstring)."""

    method = "mos"
    r: int | None = option(None, help=f"active rank of every layer; None: the paper's {PAPER_R}, lowered to what a "
                           "shallow model's pools hold (r_pri + (r_eq - r_pri) x layers)", flag="--rank", short="-r")
    r_eq: int = option(4, help="equivalent rank: trainable parameters equal a rank-r_eq LoRA on every layer")
    r_pri: int = option(2, help="private rank vectors per layer (0 switches privatization off)")
    shards: int | None = option(None, help=f"l, shards per rank vector (1 switches vector sharding off); None: "
                                f"{PAPER_SHARDS}, or the largest of 2, 1 that divides every dimension")
    alpha: float = option(16.0, help="scale numerator: ΔW is scaled by alpha / r", flag=True)
    dropout: float = option(0.1, help="dropout on the adapter input", flag=True)
    subset_selection: bool = option(True, help="each layer draws its own random subset of public shards")
    dissociation: bool = option(True, help="draw the A and B index vectors independently")
    seed: int = option(0, help="seeds the pools' initialisation and every layer's indices")

    def validate(self) -> None:
        check_positive(self, "r_eq", "alpha")
        if self.r is not None:
            check_positive(self, "r")
        if self.shards is not None:
            check_positive(self, "shards")
        check_dropout(self)
        if not 0 <= self.r_pri <= self.r_eq:
            raise ConfigError(f"MoSConfig.r_pri={self.r_pri} must be in [0, r_eq={self.r_eq}].")
        if self.r is None:
            return
        if self.r_eq > self.r:
            raise ConfigError(
                f"MoSConfig.r_eq={self.r_eq} > r={self.r}: the equivalent rank must not exceed the active "
                "rank (MoS saves parameters by r > r_eq). Lower r_eq or raise r."
            )
        if self.r_pri == self.r_eq and self.r > self.r_pri:
            raise ConfigError(
                f"MoSConfig.r_pri == r_eq == {self.r_eq} leaves no public shards for the other "
                f"{self.r - self.r_pri} rank vectors; lower r_pri."
            )


class ShardPools(nn.Module):
    """The global pools, one (P_A, P_B) pair per projection kind; owned once by the model."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()

    def add(self, kind: str, n: int, d_in: int, d_out: int, like: torch.Tensor, gen: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(d_in)  # Kaiming-uniform with fan = d_in
        a = (torch.rand(n, d_in, generator=gen) * 2 - 1) * bound
        self.A[kind] = nn.Parameter(a.to(device=like.device, dtype=float_dtype(like)))
        self.B[kind] = nn.Parameter(torch.zeros(n, d_out, device=like.device, dtype=float_dtype(like)))


def _kinds(targets: list[Target]) -> dict[str, tuple[int, int, int]]:
    """(d_in, d_out, layers) of every projection kind; one pool per kind needs one shape per kind."""
    out = {}
    for kind in dict.fromkeys(t.kind for t in targets):
        group = [t for t in targets if t.kind == kind]
        shapes = {(t.module.in_features, t.module.out_features) for t in group}
        if len(shapes) > 1:
            raise ConfigError(f"MoS shares one pool per projection kind, but {kind!r} has shapes {sorted(shapes)}.")
        (d_in, d_out), = shapes
        out[kind] = (d_in, d_out, len(group))
    return out


def resolve(config: MoSConfig, targets: list[Target]) -> tuple[MoSConfig, list[str]]:
    """Fill r and shards left unset from the model (see the module docstring); the notes say what was chosen."""
    kinds, changes, notes = _kinds(targets), {}, []
    if config.shards is None:
        dims = [d for d_in, d_out, _ in kinds.values() for d in (d_in, d_out)]
        changes["shards"] = next(l for l in (PAPER_SHARDS, 2, 1) if all(d % l == 0 for d in dims))
        if changes["shards"] != PAPER_SHARDS:
            notes.append(f"MoS: shards={changes['shards']} (the paper's {PAPER_SHARDS} does not divide every "
                         f"dimension of {sorted(kinds)})")
    if config.r is None:
        layers = min(L for _, _, L in kinds.values())
        held = config.r_pri + (config.r_eq - config.r_pri) * layers
        changes["r"] = min(PAPER_R, held)
        if changes["r"] < PAPER_R:
            notes.append(f"MoS: active rank r={changes['r']}, not the paper's {PAPER_R}: with {layers} layer(s) per "
                         f"projection kind, a pool holds {(config.r_eq - config.r_pri) * layers} public rank vectors "
                         f"and each layer adds {config.r_pri} private ones (set r to choose)")
    return replace(config, **changes), notes


def build_pools(targets: list[Target], config: MoSConfig) -> ShardPools:
    pools, l = ShardPools(), config.shards
    gen = torch.Generator().manual_seed(config.seed)
    for kind, (d_in, d_out, L) in _kinds(targets).items():
        group = [t for t in targets if t.kind == kind]
        for dim, what in ((d_in, "input"), (d_out, "output")):
            if dim % l:
                raise ConfigError(
                    f"MoS: {kind!r} {what} dimension {dim} is not divisible by shards={l}; "
                    f"choose shards among the divisors of {dim}."
                )
        if config.r - config.r_pri > (config.r_eq - config.r_pri) * L:
            raise ConfigError(
                f"MoS: {kind!r} has {L} layer(s), so its public pool holds {(config.r_eq - config.r_pri) * L} "
                f"rank vectors, fewer than the {config.r - config.r_pri} public ones each layer needs; "
                "lower r or raise r_eq."
            )
        pools.add(kind, config.r_eq * L * l, d_in // l, d_out // l, group[0].module.weight, gen)
    return pools


def draw_indices(config: MoSConfig, layer: int, num_layers: int, gen: torch.Generator) -> torch.Tensor:
    """Index vector of length r·l into a kind's pool: public subset first, then the layer's private range."""
    l = config.shards
    n_pub = (config.r_eq - config.r_pri) * num_layers * l
    n_pick = (config.r - config.r_pri) * l
    # Without subset selection every layer uses the same public shards: plain sharing, the ablation baseline.
    public = torch.randperm(n_pub, generator=gen)[:n_pick] if config.subset_selection else torch.arange(n_pick)
    start = n_pub + layer * config.r_pri * l
    private = torch.arange(start, start + config.r_pri * l)
    return torch.cat([public, private])


class MoSLinear(AdapterLinear):
    """A Linear whose LoRA factors are gathered from the shared pools by fixed indices."""

    def __init__(self, base: nn.Linear, target: Target, config: MoSConfig, pools: ShardPools) -> None:
        super().__init__(base)
        self.r, self.l, self.kind = config.r, config.shards, target.kind
        self.scale = config.alpha / config.r
        self._pools = (pools,)  # a tuple hides the shared module from this module's children
        self.dropout = make_dropout(config.dropout)
        # Seeded per (seed, kind, layer) so indices do not depend on which other modules are adapted.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{target.kind}:{target.layer}".encode()))
        idx_a = draw_indices(config, target.layer, target.num_layers, gen)
        idx_b = draw_indices(config, target.layer, target.num_layers, gen) if config.dissociation else idx_a
        self.register_buffer("idx_A", idx_a.to(base.weight.device))
        self.register_buffer("idx_B", idx_b.clone().to(base.weight.device))

    @property
    def pools(self) -> ShardPools:
        return self._pools[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, d_in]: row j = concat_s P_A[I_A[j·l + s]]; B [d_out, r] built the same way from P_B."""
        a = self.pools.A[self.kind][self.idx_A].reshape(self.r, self.in_features)  # [r·l, d_in/l] -> [r, d_in]
        b = self.pools.B[self.kind][self.idx_B].reshape(self.r, self.out_features)  # [r·l, d_out/l] -> [r, d_out]
        return a, b.T

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        h = adapter_input(x, self.dropout, a.dtype)
        return (h @ a.T @ b.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.factors()
        return a, b, self.scale


def _wrap(target: Target, config: MoSConfig, pools: nn.Module | None) -> MoSLinear:
    assert isinstance(pools, ShardPools)
    return MoSLinear(target.module, target, config, pools)


METHOD = Method("mos", MoSConfig, _wrap, build_shared=build_pools, resolve=resolve)
