"""APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025).

Adam runs on a random projection of each weight's gradient (a seeded Gaussian matrix / sqrt(r), redrawn every
`update_proj_gap` steps, no SVD); the ratio of the norms of its direction and of the projected gradient, per
channel (row or column) or for the whole tensor, scales the raw full-size gradient. The norm-growth limiter
of Fira caps how fast that scaled gradient's norm may grow (1.01x per step). APOLLO-Mini is rank 1 with one
scale per tensor and `scale` 128 (the paper's settings), about zero state. The same update as apollo-torch's
`APOLLOAdamW` for the same seeds, bitwise on CPU (`tests/test_optim_projected.py`): random matrices are drawn on
the CPU with torch's generator, so they are the same on every device and every FSDP2 rank (apollo-torch draws
them on the gradient's device, so on a GPU its matrices differ from these).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from memfit.errors import ConfigError
from memfit.optim.projected import ProjectedAdam, Shard

SCALE_TYPES = ("channel", "tensor")
SEED_ADVANCE = 15  # draws between one projector's seed and the next, as apollo-torch does
LIMIT = 1.01  # the norm-growth limiter's largest growth of the scaled gradient's norm per step


def next_seed(seed: int) -> int:
    """The seed of a parameter's next random projector, drawn from its current one as apollo-torch does."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=gen)[-1])


class Apollo(ProjectedAdam):
    """Adam-level updates from a random low-rank projection of each 2-D weight's gradient (others: plain Adam)."""

    method = "APOLLO"
    needs_gradient = False  # a random projector: only the shape matters

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int | None = 256, update_proj_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", limiter: bool = True, states: str = "fp32",
                 names: dict[torch.Tensor, str] | None = None) -> None:
        if scale_type not in SCALE_TYPES:
            raise ConfigError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}.")
        super().__init__(params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, states, names,
                         scale_type=scale_type, limiter=limiter)

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        r = group["rank"]
        shape = (r, p.shape[1]) if self.right(p.shape) else (p.shape[0], r)
        if "seed" not in state:  # the parameter's position among all parameters (1-based), as apollo-torch seeds
            state["seed"] = 1 + [id(q) for g in self.param_groups for q in g["params"]].index(id(p))
        gen = torch.Generator().manual_seed(state["seed"])
        proj = torch.randn(shape, generator=gen) / math.sqrt(r)
        state["seed"] = next_seed(state["seed"])
        return proj.to(grad.device, grad.dtype)

    def _direction(self, p: torch.Tensor, grad: torch.Tensor, low: torch.Tensor, direction: torch.Tensor,
                   state: dict[str, Any], group: dict[str, Any], shard: Shard) -> torch.Tensor:
        right = self.right(p.shape)  # then low and direction hold this rank's rows; else they are whole
        if group["scale_type"] == "channel":
            dim = 1 if right else 0  # along the projected side: one factor per row or column
            factor = torch.norm(direction, dim=dim) / (torch.norm(low, dim=dim) + 1e-8)
            factor = factor.unsqueeze(1) if dim == 1 else factor
        else:
            norm = shard.norm if right else torch.norm
            factor = norm(direction) / (norm(low) + 1e-8)
        scaled = grad * factor
        if group["limiter"]:
            norm = shard.norm(scaled)
            if "scaled_grad" in state:
                limiter = max(norm / (state["scaled_grad"] + 1e-8), LIMIT) / LIMIT
                scaled = scaled / limiter
                norm = norm / limiter
            state["scaled_grad"] = norm
        return scaled * math.sqrt(group["scale"])


class ApolloMini(Apollo):
    """APOLLO-Mini: APOLLO at rank 1 with one scale per tensor and scale 128 (the paper's settings); every other
    argument as `Apollo`'s."""

    method = "APOLLO-Mini"

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int | None = 1, scale: float = 128.0,
                 scale_type: str = "tensor", **kw: Any) -> None:
        super().__init__(params, lr=lr, rank=rank, scale=scale, scale_type=scale_type, **kw)
