"""Adam in a low-rank subspace of each weight's gradient: the common body of GaLore and APOLLO.

A 2-D weight of shape [m, n] in a projected group keeps Adam's moments for its projected gradient only:
[m, r] when m >= n (the projection acts on the right), [r, n] otherwise, so its state is r/min(m, n) of
Adam's. Every `update_proj_gap` steps the projector is rebuilt from the current gradient (GaLore: its top-r
singular vectors; APOLLO: a seeded random matrix); the moments are kept across a refresh, as both papers do.
A subclass says how the projector is built and how the subspace's Adam direction becomes the full update.

The update follows the authors' packages (galore-torch, apollo-torch), which the tests hold it to bitwise:
Adam with eps added to sqrt(v), both bias corrections folded into the step size, and decoupled weight decay
applied after the update. Parameters that are not 2-D (biases, norms), and groups with `rank=None`, get that
same Adam unprojected. With `states="8bit"` the moments are block-wise 8-bit and the subspace update runs
through AdamW8bit's fused kernel (its rounding, not the packages'). The projector, the moments and every
counter are tensors or numbers in the state, so `memfit.optim.checkpoint` saves them without pickle and a
resumed run continues bitwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from memfit.errors import ConfigError, TrainingError
from memfit.optim.adamw8bit import Q_KEYS, local, step_8bit, zero_states
from memfit.optim.quant import blocks_per_row

STATES = ("fp32", "8bit")
MIN_8BIT = 4096  # smaller moments stay fp32, as in AdamW8bit: a rounding error of the memory


class ProjectedAdam(torch.optim.Optimizer, ABC):
    """Adam on projected gradients; subclasses implement `_refresh` and `_direction`."""

    method = "projected Adam"
    needs_gradient = True  # whether `_refresh` reads the (whole) gradient, gathered from the shards when sharded

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 rank: int | None, update_proj_gap: int, scale: float, states: str = "fp32",
                 names: dict[torch.Tensor, str] | None = None, **extra: Any) -> None:
        if lr < 0.0:
            raise ConfigError(f"lr must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas must lie in [0, 1), got {betas}.")
        if update_proj_gap < 1:
            raise ConfigError(f"update_proj_gap must be >= 1 step, got {update_proj_gap}.")
        if states not in STATES:
            raise ConfigError(f"states must be one of {STATES}, got {states!r}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, **extra)
        super().__init__(params, defaults)
        self.states = states
        self.names = {id(p): n for p, n in (names or {}).items()}
        for group in self.param_groups:
            for p in group["params"]:
                self._check(p, group)

    def _name(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), "a parameter")

    def _check(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        rank = group["rank"]
        if rank is None or p.dim() != 2:
            return
        if hasattr(p, "to_local"):
            if any(not pl.is_shard(0) for pl in p.placements):
                raise ConfigError(f"{self.method} follows FSDP2's row shards (dim 0), but {self._name(p)} is placed "
                                  f"as {p.placements}; shard it with memfit's --shard (fully_shard), or keep it in a "
                                  "group with rank=None.")
            if p.device.type == "cpu" and torch.distributed.get_backend(p.device_mesh.get_group()) == "nccl":
                raise ConfigError(f"{self.method} all-reduces its projections between ranks, and NCCL cannot do "
                                  "that with shards kept on the CPU: drop --cpu-offload, or use --optim adamw8bit "
                                  "with it.")
        if not 1 <= rank <= min(p.shape):
            raise ConfigError(f"{self.method} rank {rank} does not fit {self._name(p)} {list(p.shape)}: the rank must "
                              f"be between 1 and its smaller dimension, {min(p.shape)}; lower the rank "
                              "(--proj-rank) or keep this weight in a group with rank=None.")

    @staticmethod
    def projected(p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group["rank"] is not None and p.dim() == 2

    @staticmethod
    def right(shape: torch.Size) -> bool:
        """Whether the projection acts on the right ([m, n] -> [m, r]): for tall and square weights."""
        return shape[0] >= shape[1]

    def planned_state_bytes(self) -> int:
        """The state this rank will hold once every parameter has stepped (moments, projectors)."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                size, rows = local(p).element_size(), local(p).shape[0] if p.dim() else 1
                if not self.projected(p, group):
                    moments, extra = local(p).numel(), 0
                else:
                    n, r = p.shape[1], group["rank"]
                    # right: moments of this rank's rows, the whole [r, n] projector; left: the reverse
                    moments, extra = (rows * r, r * n) if self.right(p.shape) else (r * n, rows * r)
                eight = self._8bit_size(p, group)  # two codes per value and an fp32 absmax per block, or two floats
                total += 2 * (moments + 4 * blocks_per_row(moments)) if eight else 2 * size * moments
                total += extra * size
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but every state tensor keeps its dtype (torch would cast the 8-bit codes to the
        parameter's float dtype)."""
        states = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        for key, s in states.items():
            p = params[int(key)]
            self.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}

    # -- moments ----------------------------------------------------------------------------------------------
    def _8bit_size(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether `states="8bit"` quantises this parameter's moments: by their whole size, the same on every rank
        (subspace moments of projected weights, and the plain moments of the others, embeddings included)."""
        if self.states != "8bit":
            return False
        if not self.projected(p, group):
            return p.numel() >= MIN_8BIT
        m, n, r = p.shape[0], p.shape[1], group["rank"]
        return (m * r if self.right(p.shape) else r * n) >= MIN_8BIT

    def _quantized(self, p: torch.Tensor, state: dict[str, Any], low: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether this parameter's moments are 8-bit (creating them, zero, at its first step)."""
        if "exp_avg_q" in state:
            return True
        if not self._8bit_size(p, group) or "exp_avg" in state:
            return False
        state.update(zero_states(low.numel(), blocks_per_row(low.numel()), low.device))
        return True

    def _adam_8bit(self, state: dict[str, Any], low: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """m / (sqrt(v) + eps) with 8-bit moments, by the fused AdamW8bit update run on a zero buffer (decay 1,
        step 1, bias corrections 1), so the same kernel (or its torch-op fallback) serves both optimizers. The
        maths runs in fp32 whatever the weight's dtype."""
        beta1, beta2 = group["betas"]
        hp = torch.tensor([1 - beta1, beta2, 1 - beta2, 1.0, 1.0, 1.0, group["eps"]])  # CPU, as step_8bit wants
        direction = torch.zeros(low.shape, device=low.device)
        step_8bit(direction.view(-1), low.float().contiguous().view(-1), *(state[k] for k in Q_KEYS), hp,
                  low.numel())
        return direction.to(low.dtype)

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._check_finite([p for p, _ in stepping])
        for p, group in stepping:
            self._update(p, group)
        return loss

    def _check_finite(self, params: list[torch.Tensor]) -> None:
        """All gradients checked before any weight moves, with one host sync (and, sharded, one all-reduce, so
        that every rank stops together instead of waiting in a collective for the one that raised)."""
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise ConfigError(f"{self.method} does not support sparse gradients; use dense embeddings.")
        bad = torch.stack([~torch.isfinite(local(p.grad)).all() for p in params]).to(torch.int32)
        sharded = next((p for p in params if hasattr(p, "to_local")), None)
        if sharded is not None:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=sharded.device_mesh.get_group())
        flags = bad.bool().tolist()
        if any(flags):
            name = self._name(params[flags.index(True)])
            raise TrainingError(f"{self.method}: the gradient of {name} holds NaN or inf values; lower --lr or check "
                                "the data (no weight was changed by this step).")

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        shard = Shard.of(p)
        grad = local(p.grad)
        state = self.state[p]
        state.setdefault("step", 0)
        projected = self.projected(p, group)
        if projected:
            if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
                full = p.grad.full_tensor() if shard.group is not None and self.needs_gradient else grad
                proj = self._refresh(p, full, state, group)
                if shard.group is not None and self.needs_gradient:  # one SVD for all: rank 0's, not n near-equal
                    torch.distributed.broadcast(proj, torch.distributed.get_global_rank(shard.group, 0), shard.group)
                state["projector"] = proj if self.right(p.shape) else shard.rows(proj)  # [m, r]: this rank's rows
            proj = state["projector"]
            # right: each row of the gradient projects alone (rows stay sharded); left: a sum over rows
            low = self._project(grad, proj) if self.right(p.shape) else shard.sum(proj.t() @ grad)
        else:
            low = grad
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        if self._quantized(p, state, low, group):
            direction = self._adam_8bit(state, low, group)
        else:
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(low, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            direction = m / v.sqrt().add_(group["eps"])
        if projected:
            direction = self._direction(p, grad, low, direction, state, group, shard)
        w = local(p)
        w.add_(direction, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    def _project(self, grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """The right projection grad · projᵀ (a method: the BLAS path, hence the last bit, depends on layouts)."""
        return grad @ proj.t()

    @abstractmethod
    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        """A new projector for the whole weight: [r, n] when `right(p.shape)`, else [m, r]."""

    @abstractmethod
    def _direction(self, p: torch.Tensor, grad: torch.Tensor, low: torch.Tensor, direction: torch.Tensor,
                   state: dict[str, Any], group: dict[str, Any], shard: Shard) -> torch.Tensor:
        """This rank's rows of the update direction, from the subspace's Adam direction (`low`: the projected
        gradient; `grad`: this rank's rows of the gradient)."""


@dataclass(frozen=True)
class Shard:
    """Where a parameter's local rows sit: the whole tensor, or an FSDP2 shard of rows (dim 0) of its mesh.

    With the right projection every row of the subspace belongs to one rank, so moments and directions shard like
    the weight; with the left one the projected gradient is a sum over all rows (one all-reduce of r x n values),
    and its moments are the same on every rank. Whole-tensor norms of row-sharded values are all-reduced."""

    group: Any = None  # the process group; None: not sharded
    start: int = 0
    stop: int | None = None

    @staticmethod
    def of(p: torch.Tensor) -> Shard:
        """The shard of a parameter (a whole tensor unless it is a DTensor)."""
        if not hasattr(p, "to_local"):
            return Shard()
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return Shard(p.device_mesh.get_group(), offset[0], offset[0] + shape[0])

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole [m, ...] tensor."""
        return t if self.group is None else t[self.start:self.stop].contiguous()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (a partial sum on each rank becomes the whole one)."""
        if self.group is not None:
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        """The norm of the whole row-sharded tensor whose local rows are `t`."""
        if self.group is None:
            return torch.norm(t)
        return self.sum(t.square().sum()).sqrt()
