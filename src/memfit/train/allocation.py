"""Adaptive ranks in memfit's trainer: the allocator callback, and where the ranks went (table grid, ranks.png).

The pipeline adds `AllocatorCallback` whenever the method has an allocator (`Method.allocator`), so a new adaptive
method needs nothing here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memfit.adapters.adaptive import JSONState, RankAllocator, rank_allocator
from memfit.errors import ConfigError
from memfit.train.callbacks import Callback

if TYPE_CHECKING:
    from memfit.train.trainer import Trainer


class AllocatorCallback(Callback):
    """memfit's Trainer with an adaptive adapter: adds the regulariser to the loss, steps the allocator after
    every update, logs each rank change to metrics.jsonl ("grow" or "mask" events), returns the final ranks (in
    the "end" event and finetune()'s summary) and draws ranks.png. Its state rides in the trainer's checkpoints,
    so --resume continues the schedule.
    """

    def __init__(self) -> None:
        self.alloc: RankAllocator | None = None

    def _allocator(self, trainer: Trainer) -> RankAllocator:
        if self.alloc is None:
            if trainer.ranks.world_size > 1:
                raise ConfigError("adaptive-rank methods change parameter shapes while training, which FSDP2 "
                                  "shards cannot follow; train them on one process (without torchrun/--shard).")
            alloc = rank_allocator(trainer.model, total_steps=trainer.total_steps)
            if alloc.adds_parameters and trainer.config.optim == "offload-disk":
                raise ConfigError(f"{trainer.model.memfit_config.method} adds parameters while it trains, and "
                                  "--optim offload-disk lays out its swap files at the first step; use --optim "
                                  "offload-cpu, adamw8bit or adamw.")
            self.alloc = alloc
        return self.alloc

    def on_train_begin(self, trainer: Trainer) -> None:
        self._allocator(trainer)

    def loss(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        # The trainer sums micro-batch losses into one update: the regulariser counts once per update.
        return loss + self._allocator(trainer).regularization() / trainer.config.grad_accum

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        event = self._allocator(trainer).step(step, trainer.optimizer, trainer.scheduler)
        if event is not None:
            trainer.metrics.log(event)

    def on_train_end(self, trainer: Trainer) -> dict[str, Any]:
        alloc = self._allocator(trainer)
        alloc.finish()
        ranks = alloc.ranks()
        if trainer.ranks.main:
            plot_ranks(ranks, Path(trainer.out_dir) / "ranks.png", budget=alloc.target_total_rank)
        return {"ranks": ranks, "total_rank": sum(ranks.values()), "target_total_rank": alloc.target_total_rank}

    def state_dict(self) -> JSONState:
        return self.alloc.state_dict() if self.alloc is not None else {}

    def load_state_dict(self, state: JSONState, trainer: Trainer) -> None:
        self._allocator(trainer).load_state_dict(state, trainer.optimizer, trainer.scheduler)


_LAYER = re.compile(r"\.(\d+)\.")


def rank_grid(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[int | None]]]:
    """(layer indices, module kinds, grid[layer][kind]) from module paths. The layer is the first number in the
    path ("model.layers.3.self_attn.q_proj" -> 3); the kind is the last component ("q_proj"), or the whole path
    after the layer number where last components repeat (BERT's "attention.output.dense", "output.dense").
    Missing cells are None."""
    located = []
    for name, rank in ranks.items():
        match = _LAYER.search(f".{name}.")
        layer, kind = (int(match.group(1)), f".{name}."[match.end():-1]) if match else (0, name)
        located.append((layer, kind, rank))
    full = {kind for _, kind, _ in located}
    short = len({k.rpartition(".")[2] for k in full}) == len(full)
    cells = {(layer, kind.rpartition(".")[2] if short else kind): rank for layer, kind, rank in located}
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    return layers, kinds, [[cells.get((layer, kind)) for kind in kinds] for layer in layers]


def plot_ranks(ranks: dict[str, int], path: str | Path, budget: int | None = None) -> Path:
    """ranks.png: the rank of every module, layers down, module kinds across, the number in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    layers, kinds, grid = rank_grid(ranks)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.9 * len(kinds)), max(3.0, 1.4 + 0.35 * len(layers))))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * np.nanmax(values) else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    total = sum(ranks.values())
    ax.set_title("rank per module\n" + f"total {total}" + (f" of a budget of {budget}" if budget is not None else ""),
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="rank").ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
