"""IncreLoRA (Zhang et al., 2023; author code FeiyuZhang98/IncreLoRA): start small, add rank where it matters.

ΔW = (α/k)·Σ_j b_j·e_j·a_jᵀ = B·diag(e)·A·α/k, k = the module's active components. Components live in chunks
(chunk 0 holds the `init_rank` initial ones, later chunks one component each) so that growth appends parameters
instead of resizing them: the optimizer keeps every existing state.

- Importance of a module: S = Σ|ΔW ⊙ ∂L/∂ΔW| / √(d_out·d_in), taken by a hook on the composed ΔW (so ΔW is
  materialised while ranks grow, and only then), smoothed into Ī·Ū with β1 = β2 = 0.85.
- Growth: after `t_init` updates, every `interval` updates while the total rank is below the budget
  (target_rank × modules), the `top_h` modules with the highest scores each activate `rank_step` components.
  The last event activates only what is left, so the total never passes the budget.
- Advance learning: each module keeps `rank_step` reserve components whose a, b ~ N(0, 0.02) train through a
  frozen e = 1e-5 before they are chosen; Adam normalises the tiny gradient away, so they arrive pre-trained.
  When chosen, e becomes trainable, fresh reserves are appended, and the new parameters join the optimizer as a
  new parameter group with its own linear warmup, then linear decay to the end of the run ("restart warmup").
- Orthogonality regulariser (weight 0.1) on each module's whole A and B. The author's code applies it to every
  appended piece separately, which for one-row pieces only normalises them; the whole factor is what the
  SVD-like parameterisation asks for.
- When the budget is reached, the hooks go, the reserves are switched off (e = 0), and the forward is the cheap
  factored product again.
"""

from __future__ import annotations

import math
import re
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

INIT_STD = 0.02  # a, b ~ N(0, 0.02), as in the author's code
T_INIT_SHARE, GROWTH_END_SHARE = 0.1, 0.8  # defaults: first growth after 10% of the run, budget full at 80%
_CHUNK = re.compile(r"lora_A\.(\d+)$")


@dataclass
class IncreLoRAConfig(AdapterConfig):
    """IncreLoRA. Defaults follow the paper's GLUE runs: init rank 1, target rank 2, α 16, top-h 2, β 0.85 (the
    author's names: init_warmup = t_init, incre_interval = interval, incre_rank_num = rank_step)."""

    method = "increlora"
    init_rank: int = option(1, help="components per module at the start", flag=True)
    target_rank: int = option(2, help="average rank at the end: the budget is target_rank x modules", flag=True)
    alpha: float = option(16.0, help="ΔW is scaled by alpha / k, k = a module's active components", flag=True)
    dropout: float = option(0.0, help="dropout on the adapter input", flag=True)
    t_init: int | None = option(None, help=f"updates before the first growth; None: {T_INIT_SHARE:.0%} of the run",
                                flag=True)
    interval: int | None = option(None, help=f"updates between growth events; None: spread so that the budget is "
                                  f"reached at {GROWTH_END_SHARE:.0%} of the run", flag=True)
    top_h: int = option(2, help="modules that grow per event")
    rank_step: int | None = option(None, help="components each growing module activates; None: target_rank // 2 "
                                   "(at least 1)")
    restart_warmup: int | None = option(None, help="warmup updates of each new parameter group; None: interval")
    beta1: float = option(0.85, help="EMA factor of the sensitivity")
    beta2: float = option(0.85, help="EMA factor of the uncertainty")
    orth_reg_weight: float = option(0.1, help="weight of the orthogonality regulariser")
    reserve_e: float = option(1e-5, help="the frozen e of reserve components (advance learning)")
    init: str = option("gaussian", help="how components start: gaussian (the author's: e = 0, a, b ~ N(0, 0.02)) "
                       "or lora (LoRA's: b = 0, a Kaiming, e = 1; faster on short runs; reserves still learn in "
                       "advance, and a grown one continues with e folded into b, e = 1)", flag=True)

    def validate(self) -> None:
        check_positive(self, "init_rank", "target_rank", "alpha", "top_h", "reserve_e")
        check_dropout(self)
        check_init(self)
        if self.target_rank < self.init_rank:
            raise ConfigError(f"IncreLoRAConfig.target_rank={self.target_rank} < init_rank={self.init_rank}: IncreLoRA "
                              "only grows ranks. Lower init_rank, or use AdaLoRAConfig to prune from a larger start.")
        for name in ("interval", "rank_step", "restart_warmup"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"IncreLoRAConfig.{name} must be > 0 (or None for the default), "
                                  f"got {getattr(self, name)}.")
        if self.t_init is not None and self.t_init < 0:
            raise ConfigError(f"IncreLoRAConfig.t_init must be >= 0 (or None for the default), got {self.t_init}.")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"IncreLoRAConfig.{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"IncreLoRAConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")

    @property
    def step_rank(self) -> int:
        return self.rank_step or max(1, self.target_rank // 2)

    def schedule(self, num_modules: int, total_steps: int | None) -> tuple[int, int, int]:
        """(t_init, interval, restart_warmup) for `num_modules` modules and a run of `total_steps` updates."""
        missing = [n for n in ("t_init", "interval") if getattr(self, n) is None]
        if missing and total_steps is None:
            raise ConfigError(f"IncreLoRA derives {missing} from the length of the run: set them, or pass "
                              "memfit.rank_allocator(model, total_steps=<number of optimizer updates>).")
        t_init = self.t_init if self.t_init is not None else round(T_INIT_SHARE * total_steps)
        rounds = math.ceil((self.target_rank - self.init_rank) * num_modules / (self.top_h * self.step_rank))
        interval = self.interval or max(1, (int(GROWTH_END_SHARE * total_steps) - t_init) // max(1, rounds))
        return t_init, interval, self.restart_warmup or interval


class IncreLoRALinear(AdapterLinear):
    """A Linear plus B·diag(e)·A·α/k over its chunks: active components first, then the reserve."""

    def __init__(self, base: nn.Linear, config: IncreLoRAConfig) -> None:
        super().__init__(base)
        self.alpha, self.init_rank, self.reserve_e = config.alpha, config.init_rank, config.reserve_e
        self.init = config.init
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.register_buffer("rank", torch.tensor(config.init_rank))
        self.k = config.init_rank  # python copy of `rank`: the forward needs it without a device sync
        self.dropout = make_dropout(config.dropout)
        self._add_chunk(config.init_rank, active=True, init=config.init)
        for _ in range(config.step_rank):
            self._add_chunk(1, active=False, e=config.reserve_e)
        self.reserve_live = True  # reserve components are in the forward (advance learning)
        self.track_importance = True  # the ΔW hook is on
        self._score: torch.Tensor | None = None

    # -- structure ---------------------------------------------------------------------------------------------
    def _add_chunk(self, r: int, active: bool, init: str = "gaussian", e: float | None = None) -> int:
        """Append a chunk of r components started the `init` way; `e`, when given, replaces the start's e (a
        reserve's frozen reserve_e)."""
        # Later chunks follow the first one (which moved with the adapter), not a possibly streamed base weight.
        like = self.lora_A[0] if len(self.lora_A) else self.weight
        dtype = float_dtype(like)
        a = torch.empty(r, self.in_features, dtype=dtype, device=like.device)
        b = torch.empty(self.out_features, r, dtype=dtype, device=like.device)
        e_init = torch.empty(r, 1, dtype=dtype, device=like.device)
        init_components(a, e_init, b, init, INIT_STD)
        if e is not None:
            e_init.fill_(e)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(b))
        self.lora_E.append(nn.Parameter(e_init, requires_grad=active))
        return len(self.lora_A) - 1

    @property
    def active_chunks(self) -> int:
        return 1 + self.k - self.init_rank

    @property
    def scale(self) -> float:
        return self.alpha / self.k

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [k′, in], e [k′, 1], B [out, k′]) of the components in the forward (k′ = k + live reserve)."""
        n = len(self.lora_A) if self.reserve_live else self.active_chunks
        return (torch.cat(list(self.lora_A[:n])), torch.cat(list(self.lora_E[:n])),
                torch.cat(list(self.lora_B[:n]), dim=1))

    def grow(self, n: int) -> list[tuple[str, nn.Parameter]]:
        """Activate the first `n` reserve components and append `n` fresh reserves; returns the (relative name,
        parameter) pairs that are new to the optimizer: the activated e and the new reserves' a and b. From LoRA's
        start (init "lora") an activated component's e is folded into its b, so its b's gradient grows by 1/e:
        the allocator then restarts that b's optimizer state."""
        first = self.active_chunks
        new = []
        for i in range(first, first + n):
            if self.init == "lora":  # LoRA's start from here on: e's scale folded into b (b·e·a unchanged), e = 1
                with torch.no_grad():
                    self.lora_B[i].mul_(self.lora_E[i].view(1, -1))
                    self.lora_E[i].fill_(1.0)
            self.lora_E[i].requires_grad_(True)
            new.append((f"lora_E.{i}", self.lora_E[i]))
        self.k += n
        self.rank.fill_(self.k)
        for _ in range(n):
            i = self._add_chunk(1, active=False, e=self.reserve_e)
            new += [(f"lora_A.{i}", self.lora_A[i]), (f"lora_B.{i}", self.lora_B[i])]
        return new

    @torch.no_grad()
    def stop_growing(self) -> None:
        """The budget is reached: drop the ΔW hook and switch the reserve components off."""
        for e in self.lora_E[self.active_chunks:]:
            e.zero_()
        self.reserve_live = self.track_importance = False
        self._score = None

    def resize_to_state(self, state: dict[str, torch.Tensor]) -> None:
        """Give this module the chunks of a saved state (keys relative to the module) before it is loaded."""
        chunks = sorted(int(m.group(1)) for k in state if (m := _CHUNK.match(k)))
        for i in range(len(self.lora_A), len(chunks)):
            self._add_chunk(state[f"lora_A.{i}"].shape[0], active=False)  # values come from the state
        if "rank" in state:
            self.k = int(state["rank"])
        for i, e in enumerate(self.lora_E):
            e.requires_grad_(i < self.active_chunks)
        reserve = [state[f"lora_E.{i}"] for i in range(self.active_chunks, len(chunks)) if f"lora_E.{i}" in state]
        self.reserve_live = self.track_importance = any(bool(e.ne(0).any()) for e in reserve)

    # -- forward and importance -------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, e, b = self._parts()
        h = adapter_input(x, self.dropout, a.dtype)
        if self.track_importance and torch.is_grad_enabled() and a.requires_grad:
            delta = (b @ (a * e)) * self.scale  # [out, in]: the hook needs ∂L/∂ΔW
            delta.register_hook(lambda g, d=delta.detach(): self._record(d, g))
            return h @ delta.T
        return (h @ (a * e).T @ b.T) * self.scale

    def _record(self, delta: torch.Tensor, grad: torch.Tensor) -> None:
        # Summed over the micro-batches of an update; exact for one micro-batch, an upper bound otherwise.
        score = (delta * grad).abs().sum() / math.sqrt(delta.numel())
        self._score = score if self._score is None else self._score + score

    def take_score(self) -> torch.Tensor | None:
        score, self._score = self._score, None
        return score

    def delta_weight(self) -> torch.Tensor:
        a, e, b = self._parts()
        return (b @ (a * e)) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, e, b = self._parts()
        return a * e, b, self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, _, b = self._parts()
        return a, b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.k}, reserve_live={self.reserve_live}"


class RestartWarmup:
    """LR factor of a parameter group born at update `born`: linear warmup over `warmup` updates, then linear
    decay to 0 at update `total` (constant without one). A plain object, so LambdaLR saves and restores it."""

    def __init__(self, born: int, warmup: int, total: int | None) -> None:
        self.born, self.warmup, self.total = born, warmup, total

    def __call__(self, step: int) -> float:
        age = step - self.born  # updates the group has seen; the next update is its age + 1-th
        if age < self.warmup:
            return (age + 1) / self.warmup
        if self.total is None:
            return 1.0
        return max(0.0, (self.total - step) / max(1, self.total - self.born - self.warmup))


class IncreLoRAAllocator(RankAllocator):
    """Grows ranks on schedule and hands the new parameters to the optimizer, each event as its own group."""

    layer_type = IncreLoRALinear
    adds_parameters = True

    def __init__(self, model: nn.Module, config: IncreLoRAConfig, total_steps: int | None) -> None:
        super().__init__(model, config, total_steps)
        self.t_init, self.interval, self.restart_warmup = config.schedule(len(self.modules), total_steps)
        self.ema = ImportanceEMA(config.beta1, config.beta2)
        self.groups: list[dict[str, Any]] = []  # {"born": step, "params": [names]}, in optimizer order
        self._param_groups: list[dict[str, Any]] = []  # the optimizer's dicts of those groups
        self.base_lr: float | None = None

    @property
    def growing(self) -> bool:
        return any(m.reserve_live for m in self.modules.values())

    def ranks(self) -> dict[str, int]:
        return {name: m.k for name, m in self.modules.items()}

    def factors(self):
        for m in self.modules.values():
            yield m.factors()

    def growth_steps(self) -> list[int]:
        """The updates at which ranks grow if the budget is not reached earlier (for plans and tests)."""
        rounds = math.ceil((self.target_total_rank - sum(self.ranks().values()))
                           / (self.config.top_h * self.config.step_rank))
        first = (self.t_init // self.interval + 1) * self.interval
        return [first + i * self.interval for i in range(rounds)]

    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None) -> dict[str, Any] | None:
        event = None
        if self.growing:
            self._update_importance()
            if sum(self.ranks().values()) >= self.target_total_rank:
                self.finish()
            elif global_step > self.t_init and global_step % self.interval == 0:
                if optimizer is None:
                    raise ConfigError("IncreLoRA gives the parameters it adds to the optimizer: call "
                                      "alloc.step(global_step, optimizer[, scheduler]).")
                event = self._grow(global_step, optimizer, scheduler)
        if scheduler is None and optimizer is not None:
            self._set_lrs(global_step)
        if self.total_steps is not None and global_step >= self.total_steps:
            self.finish()
        return event

    @torch.no_grad()
    def _update_importance(self) -> None:
        for name, m in self.modules.items():
            score = m.take_score()
            if score is not None:
                self.ema.update(name, score)

    def scores(self) -> torch.Tensor:
        """Ī·Ū of every module, in module order (0 for a module not scored yet)."""
        return torch.stack([self.ema.score(n).float().cpu() if n in self.ema else torch.zeros(())
                            for n in self.modules])

    def _grow(self, global_step: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
        names = list(self.modules)
        left = self.target_total_rank - sum(self.ranks().values())
        count = min(self.config.top_h, math.ceil(left / self.config.step_rank))
        chosen = torch.argsort(self.scores(), descending=True, stable=True)[:count]
        grown, new = {}, []
        for i in chosen.tolist():
            n = min(self.config.step_rank, left)
            left -= n
            grown[names[i]] = n
            layer = self.modules[names[i]]
            first = layer.active_chunks
            new += [(f"{names[i]}.{rel}", p) for rel, p in layer.grow(n)]
            if self.config.init == "lora":  # b's moments were of gradients 1/e smaller (see grow)
                for b in layer.lora_B[first:first + n]:
                    optimizer.state.pop(b, None)
        self._add_group(optimizer, scheduler, new, global_step)
        if left == 0:
            self.finish()
        return self.event(global_step, "grow", grown=grown)

    # -- parameter groups ---------------------------------------------------------------------------------------
    def _add_group(self, optimizer: torch.optim.Optimizer, scheduler: Any, named: list[tuple[str, nn.Parameter]],
                   born: int) -> None:
        first = optimizer.param_groups[0]
        if self.base_lr is None:
            self.base_lr = float(first.get("initial_lr", first["lr"]))
        factor = RestartWarmup(born, self.restart_warmup, self.total_steps)
        hyper = {k: v for k, v in first.items() if k not in ("params", "param_names", "lr", "initial_lr")}
        params = list(named) if "param_names" in first else [p for _, p in named]
        optimizer.add_param_group({**hyper, "params": params, "lr": self.base_lr * factor(born),
                                   "initial_lr": self.base_lr})
        self._param_groups.append(optimizer.param_groups[-1])
        self.groups.append({"born": born, "params": [n for n, _ in named]})
        if scheduler is not None:
            lambda_lr = _lambda_lr(scheduler)
            lambda_lr.base_lrs.append(self.base_lr)
            lambda_lr.lr_lambdas.append(factor)

    def _set_lrs(self, global_step: int) -> None:
        """Without a scheduler the allocator drives its groups' LR itself (for the update after `global_step`)."""
        for spec, group in zip(self.groups, self._param_groups, strict=True):
            group["lr"] = self.base_lr * RestartWarmup(spec["born"], self.restart_warmup, self.total_steps)(global_step)

    def finish(self) -> None:
        for m in self.modules.values():
            if m.reserve_live:
                m.stop_growing()

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> JSONState:
        return {**self.ema.state_dict(), "groups": self.groups, "base_lr": self.base_lr}

    def load_state_dict(self, state: JSONState, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None) -> None:
        self.ema.load_state_dict(state)
        self.base_lr = state.get("base_lr")
        self.groups, self._param_groups = [], []
        specs = state.get("groups") or []
        if specs and optimizer is None:
            raise ConfigError("this IncreLoRA run added parameter groups; pass the optimizer to load_state_dict.")
        named = dict(self.model.named_parameters())
        for spec in specs:
            missing = [n for n in spec["params"] if n not in named]
            if missing:
                raise ConfigError(f"the allocator state names parameters the model lacks, e.g. {missing[:2]}; load "
                                  "the checkpoint's adapter (memfit.load_adapter) into the model first.")
            group = [(n, named[n].requires_grad_(True)) for n in spec["params"]]
            _remove_from_groups(optimizer, {id(p) for _, p in group})
            self._add_group(optimizer, scheduler, group, spec["born"])


def _lambda_lr(scheduler: Any) -> torch.optim.lr_scheduler.LambdaLR:
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the schedulers it prepares
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(f"IncreLoRA adds parameter groups while training and registers them with the LR scheduler, "
                          f"which must be a LambdaLR (memfit's and transformers' schedules are); got "
                          f"{type(inner).__name__}. Pass scheduler=None to let the allocator set their LR itself.")
    return inner


def _remove_from_groups(optimizer: torch.optim.Optimizer, ids: set[int]) -> None:
    """Take parameters out of the groups that hold them (a resumed optimizer was built with all trainable ones)."""
    for group in optimizer.param_groups:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in ids]
        if len(keep) < len(group["params"]):
            group["params"] = [group["params"][i] for i in keep]
            if "param_names" in group:
                group["param_names"] = [group["param_names"][i] for i in keep]


def _wrap(target: Target, config: IncreLoRAConfig, shared: nn.Module | None) -> IncreLoRALinear:
    return IncreLoRALinear(target.module, config)


METHOD = Method("increlora", IncreLoRAConfig, _wrap, allocator=IncreLoRAAllocator)
