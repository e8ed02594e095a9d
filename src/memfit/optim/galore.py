"""GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024).

Each projected weight's gradient G is projected onto its top-r singular vectors, recomputed by an SVD of G every
`update_proj_gap` steps (under FSDP2 the gradient is gathered for that SVD only); Adam runs on the projected
gradient and its direction is projected back and scaled by `scale`. Defaults are the paper's (rank 128, gap 200,
scale 0.25). The same update as galore-torch's `GaLoreAdamW` (proj_type "std"), bitwise
(`tests/test_optim_projected.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from memfit.optim.projected import ProjectedAdam, Shard


class GaLore(ProjectedAdam):
    """Adam with GaLore gradient projection on 2-D weights (others: plain Adam)."""

    method = "GaLore"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, states: str = "fp32", names: dict[torch.Tensor, str] | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, states, names)

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        r = group["rank"]
        proj = vh[:r, :] if self.right(p.shape) else u[:, :r]
        return proj.to(grad.dtype).contiguous()

    def _project(self, grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        # The SVD's Vh is column-major, so the authors' projᵀ is a contiguous [n, r]: the same operands, whatever
        # layout this projector has (fresh, or loaded from a checkpoint), give their bits on every BLAS.
        return grad @ proj.t().contiguous()

    def _direction(self, p: torch.Tensor, grad: torch.Tensor, low: torch.Tensor, direction: torch.Tensor,
                   state: dict[str, Any], group: dict[str, Any], shard: Shard) -> torch.Tensor:
        proj = state["projector"]  # left: this rank's rows of it
        full = direction @ proj if self.right(p.shape) else proj @ direction
        return full * group["scale"]
