"""TrainConfig: every knob of the training loop, with its default and help text in one place.

The CLI builds the flags of every command that trains from these fields (`memfit.cli.options`), so a new knob is
one field here and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memfit.errors import ConfigError
from memfit.fields import check_types, option
from memfit.optim.projected import STATES
from memfit.optim.registry import PROJECTED

TRAINING, MEMORY, ZO = "Training", "Memory", "Zeroth order (--optim mezo)"
PROJ = "Low-rank states (--optim galore, apollo, apollo-mini)"


@dataclass
class TrainConfig:
    """How to train. Steps count optimizer updates; a batch is `batch_size` examples per micro-step."""

    epochs: int = option(1, help="Passes over the data.", panel=TRAINING)
    max_steps: int | None = option(None, help="Stop after this many updates (overrides --epochs).", panel=TRAINING)
    batch_size: int = option(16, help="Examples per micro-batch (per rank).", panel=TRAINING)
    eval_batch_size: int = option(64, help="Examples per evaluation batch.", panel=TRAINING)
    lr: float = option(5e-4, help="Peak learning rate, reached after --warmup-ratio of the updates, then decayed "
                       "linearly to 0.", panel=TRAINING)
    weight_decay: float = option(0.0, help="Decoupled weight decay (AdamW).", panel=TRAINING)
    warmup_ratio: float = option(0.06, help="Share of the updates spent warming the learning rate up.",
                                 panel=TRAINING)
    grad_accum: int = option(1, help="Micro-batches per update (the effective batch is batch size x grad accum x "
                             "ranks).", panel=TRAINING)
    max_grad_norm: float = option(1.0, help="Clip the gradient norm to this (0 disables clipping; MeZO has no gradient "
                                  "to clip).", panel=TRAINING)
    max_length: int = option(128, help="Tokens per example (longer ones are cut).", panel=TRAINING)
    seed: int = option(0, help="Seeds initialisation, dropout and the order of batches: a run is a function of it.",
                       panel=TRAINING)
    log_every: int = option(10, help="Log the training loss every N updates.", panel=TRAINING)
    eval_every: int = option(0, help="Evaluate every N updates (0: once per epoch).", panel=TRAINING)
    checkpoint_every: int = option(0, help="Checkpoint every N updates (0: once per epoch).", panel=TRAINING)
    optim: str = option("adamw", help="Optimizer: adamw, adamw8bit (2 B/param of state), offload-cpu (states in host "
                        "RAM), offload-disk (states in swap files under --out), galore / apollo / apollo-mini "
                        "(for --method full: Adam's moments in a low-rank projection of each weight's gradient, a "
                        "few percent of Adam's state; APOLLO-Mini about none), mezo (zeroth order: two forward "
                        "passes per update, no gradients or states, the memory of inference; needs a far lower --lr, "
                        "about 1e-4 for adapters, 1e-6 for --method full).", panel=MEMORY)
    weights_budget: int | str | None = option(None, help="Keep at most this much of the frozen weights in memory, e.g. "
                                        "'2GB' or '25%'; stream the other layers from disk. The input embedding "
                                        "reads only its tokens' rows from disk; when the budget needs it, the output "
                                        "head is read in vocabulary chunks by the loss.", panel=MEMORY)
    expert_budget: int | str | None = option(None, help="Mixture-of-Experts models: keep at most this much of the "
                                             "experts in memory, e.g. '25%' or '2GB'; the others stay in the "
                                             "checkpoint's safetensors and are read as routed, predicted and "
                                             "prefetched (memfit.moe), and read again by the backward, whose reads "
                                             "are known from the forward. Adapters train on the other weights "
                                             "(attention, shared experts, dense MLPs); the experts stay frozen. "
                                             "It must hold one layer's top-k experts.", panel=MEMORY)
    lean_allocator: bool = option(False, help="CPU on Linux: have glibc return every freed block above 256 KB to the "
                                  "system at once, so the peak resident set is the live bytes (4-30% lower in "
                                  "bench/plan.py, and what `memfit plan` predicts), at the cost of page faults on "
                                  "each large allocation (updates 1.3-1.6x slower there).", panel=MEMORY)
    quantize: str | None = option(None, help="Quantize the frozen base as it loads: 'nf4' (QLoRA: 4.13 bits per "
                                  "weight, 0.13x fp32) or 'int8' (8.13 bits); adapters train on top in fp32. A "
                                  "checkpoint written by `memfit quantize` loads quantized without it, and without "
                                  "ever holding the fp32 weights.", panel=MEMORY)
    shard: str | None = option(None, help="Under torchrun: FSDP2 'grad' (ZeRO-2) or 'full' (ZeRO-3).", panel=MEMORY)
    cpu_offload: bool = option(False, help="With --shard: FSDP2 CPUOffloadPolicy (shards and the step in host RAM).",
                               panel=MEMORY)

    zo_eps: float = option(1e-3, help="MeZO's perturbation scale ε: the weights move by ±ε·z to estimate the slope.",
                           panel=ZO)
    zo_perturbations: int = option(1, help="MeZO estimates averaged per update (each costs two forward passes).",
                                   panel=ZO)
    zo_sparsity: float | None = option(None, help="Sparse MeZO: the share of each weight's entries left unperturbed "
                                       "(the small-magnitude rest is perturbed and trained), e.g. 0.75.", panel=ZO)

    proj_rank: int | None = option(None, help="Rank of the gradient projection (default: GaLore 128, APOLLO 256, "
                                   "APOLLO-Mini 1); weights smaller than it, embeddings and the head keep plain "
                                   "Adam.", panel=PROJ)
    proj_gap: int | None = option(None, help="Rebuild each projection every N updates (GaLore: an SVD of the "
                                  "gradient; APOLLO: a new random matrix; default 200).", panel=PROJ)
    proj_scale: float | None = option(None, help="Scale of the projected update (default: GaLore 0.25, APOLLO 1, "
                                      "APOLLO-Mini 128).", panel=PROJ)
    proj_states: str = option("fp32", help="Adam's moments (the subspace ones, and those of the weights kept in "
                              "plain Adam) in 'fp32' or block-wise '8bit'.", panel=PROJ)
    proj_embeddings: bool = option(False, help="Project the embeddings and the output head too (the papers keep "
                                   "them in plain Adam; with a large vocabulary they are then most of the state).",
                                   panel=PROJ)

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"TrainConfig.max_steps must be > 0 (or None for whole epochs), got {self.max_steps}.")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        for name in ("eval_every", "checkpoint_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if not self.zo_eps > 0:
            raise ConfigError(f"TrainConfig.zo_eps (--zo-eps) must be > 0, got {self.zo_eps}.")
        if self.zo_perturbations < 1:
            raise ConfigError(f"TrainConfig.zo_perturbations must be >= 1, got {self.zo_perturbations}.")
        if self.zo_sparsity is not None and not 0.0 <= self.zo_sparsity < 1.0:
            raise ConfigError(f"TrainConfig.zo_sparsity must be in [0, 1) (the share of entries left unperturbed), "
                              f"got {self.zo_sparsity}.")
        if self.optim == "mezo" and self.shard is not None:
            raise ConfigError("--optim mezo keeps no gradients or optimizer states to shard; drop --shard and run "
                              "it in one process.")
        chosen = [f for f in ("proj_rank", "proj_gap", "proj_scale") if getattr(self, f) is not None]
        chosen += [f for f, default in (("proj_states", "fp32"), ("proj_embeddings", False))
                   if getattr(self, f) != default]
        if chosen and self.optim not in PROJECTED:
            flags = ", ".join("--" + f.replace("_", "-") for f in chosen)
            raise ConfigError(f"{flags} only apply to --optim galore, apollo or apollo-mini, not --optim {self.optim}.")
        if self.proj_scale is not None and not self.proj_scale > 0:
            raise ConfigError(f"TrainConfig.proj_scale (--proj-scale) must be > 0, got {self.proj_scale}.")
        if self.proj_rank is not None and self.proj_rank < 1:
            raise ConfigError(f"TrainConfig.proj_rank (--proj-rank) must be >= 1, got {self.proj_rank}.")
        if self.proj_gap is not None and self.proj_gap < 1:
            raise ConfigError(f"TrainConfig.proj_gap (--proj-gap) must be >= 1, got {self.proj_gap}.")
        if self.proj_states not in STATES:
            raise ConfigError(f"TrainConfig.proj_states (--proj-states) must be one of {', '.join(STATES)}, "
                              f"got {self.proj_states!r}.")
        if self.quantize is not None:
            from memfit.quant.codebooks import CODEBOOKS

            if self.quantize not in CODEBOOKS:
                raise ConfigError(f"TrainConfig.quantize (--quantize) must be one of {', '.join(sorted(CODEBOOKS))}, "
                                  f"got {self.quantize!r}.")
            if self.weights_budget is not None:
                raise ConfigError("--quantize with --weights-budget would quantize every layer at every read; write "
                                  "the quantized checkpoint once (memfit quantize --model M --out DIR) and stream "
                                  "DIR with --weights-budget.")
            if self.shard is not None:
                raise ConfigError("--quantize does not combine with --shard yet (FSDP2 shards fp32 weights); drop "
                                  "one of them.")
        if self.expert_budget is not None:
            clash = [flag for flag, value in (("--weights-budget", self.weights_budget), ("--shard", self.shard),
                                              ("--quantize", self.quantize)) if value is not None]
            if clash:
                raise ConfigError(f"--expert-budget does not combine with {', '.join(clash)}: the non-expert weights "
                                  "stay resident and the experts are the offloaded part (a checkpoint written by "
                                  "`memfit quantize` gives quantized experts and a quantized rest).")
        if self.shard not in (None, "grad", "full"):
            raise ConfigError(f"TrainConfig.shard must be 'grad' (ZeRO-2), 'full' (ZeRO-3) or None, "
                              f"got {self.shard!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {unknown}; valid fields: {sorted(names)}.")
        return cls(**data)
