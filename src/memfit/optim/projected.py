"""Adam in a low-rank subspace of each weight's gradient: the common body of GaLore and APOLLO.

A 2-D weight of shape [m, n] in a projected group keeps Adam's moments for its projected gradient only:
[m, r] when m >= n (the projection acts on the right), [r, n] otherwise, so its state is r/min(m, n) of
Adam's. Every `update_proj_gap` steps the projector is rebuilt from the current gradient (GaLore: its top-r
singular vectors; APOLLO: a seeded random matrix); the moments are kept across a refresh, as both papers do.
A subclass says how the projector is built and how the subspace's Adam direction becomes the full update.

The update follows the authors' packages (galore-torch, apollo-torch), which the tests hold it to bitwise:
Adam with eps added to sqrt(v), both bias corrections folded into the step size, and decoupled weight decay
applied after the update. Parameters that are not 2-D (biases, norms), and groups with `rank=None`, get that
same Adam unprojected. The projector, the moments (fp32, or block-wise 8-bit with `states="8bit"`) and every
counter are tensors or numbers in the state, so `memfit.optim.checkpoint` saves them without pickle and a
resumed run continues bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from memfit.errors import ConfigError, TrainingError
from memfit.optim.quant import dequantize, quantize, tables

STATES = ("fp32", "8bit")
MIN_8BIT = 4096  # smaller moments stay fp32, as in AdamW8bit: a rounding error of the memory


class ProjectedAdam(torch.optim.Optimizer):
    """Adam on projected gradients; subclasses implement `_refresh` and `_direction`."""

    method = "projected Adam"

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
            raise ConfigError(f"{self.method} projects whole gradient matrices, but {self._name(p)} is an FSDP2 shard; "
                              "run it without --shard (its state is already a small fraction of Adam's).")
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
        """The state this optimizer will hold once every parameter has stepped (moments, projectors)."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                if self.projected(p, group):
                    m, n, r = p.shape[0], p.shape[1], group["rank"]
                    low = m * r if self.right(p.shape) else r * n
                    per_value = 2 * (1 + 4 / 256) if self.states == "8bit" and low >= MIN_8BIT else 8
                    total += int(low * per_value) + 4 * r * (n if self.right(p.shape) else m)
                else:
                    total += 8 * p.numel()
        return total

    # -- moments ------------------------------------------------------------------------------------------
    def _moments(self, state: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        if "exp_avg_q" in state:
            m = dequantize(state["exp_avg_q"], state["exp_avg_absmax"], tables(True, like.device))
            v = dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], tables(False, like.device))
            return m.view_as(like), v.view_as(like)
        if self.states == "8bit" and like.numel() >= MIN_8BIT:
            return torch.zeros_like(like), torch.zeros_like(like)  # quantised when stored
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(like), torch.zeros_like(like)
        return state["exp_avg"], state["exp_avg_sq"]

    @staticmethod
    def _store(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        if "exp_avg" in state:
            return  # updated in place
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize(m.reshape(-1), tables(True, m.device))
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize(v.reshape(-1), tables(False, v.device))

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in stepping:  # all checked first, so a bad gradient leaves every weight as it was
            if p.grad.is_sparse:
                raise ConfigError(f"{self.method} does not support sparse gradients; use dense embeddings.")
            if not torch.isfinite(p.grad).all():
                raise TrainingError(f"{self.method}: the gradient of {self._name(p)} holds NaN or inf values; lower "
                                    "--lr or check the data (no weight was changed by this step).")
        for p, group in stepping:
            self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        state = self.state[p]
        state.setdefault("step", 0)
        projected = self.projected(p, group)
        if projected:
            if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
                state["projector"] = self._refresh(p, grad, state, group)
            proj = state["projector"]
            low = grad @ proj.t() if self.right(p.shape) else proj.t() @ grad
        else:
            low = grad
        m, v = self._moments(state, low)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m.mul_(beta1).add_(low, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        denom = v.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        direction = m / denom
        self._store(state, m, v)
        if projected:
            direction = self._direction(p, low, direction, state, group)
        p.add_(direction, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        """A new projector: [r, n] when `right(p.shape)`, else [m, r]."""
        raise NotImplementedError

    def _direction(self, p: torch.Tensor, low: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
                   group: dict[str, Any]) -> torch.Tensor:
        """The full-size update direction from the subspace's Adam direction (`low`: the projected gradient)."""
        raise NotImplementedError
