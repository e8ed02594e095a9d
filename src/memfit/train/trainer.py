"""The training loop: seeded batches, exact loss normalisation, LR schedule, eval, checkpoints, resume.

One update = `grad_accum` micro-batches of `batch_size` examples on each of `world_size` ranks. The loss of
every micro-batch is its summed loss divided by the number of targets in the whole update (all micro-batches,
all ranks), times the world size because FSDP2 averages gradients over ranks: the update is then the one a
single big batch would give, whatever the split, and a 2-rank run reproduces a 1-process run.

Batches come from a permutation seeded by (seed, epoch), and the checkpoint stores the position in the epoch
and the RNG state, so `fit(resume=True)` continues the interrupted run step for step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from memfit.errors import CheckpointError, ConfigError, TrainingError
from memfit.optim import build_optimizer
from memfit.optim.checkpoint import load_optimizer, save_optimizer
from memfit.optim.registry import PROJECTED
from memfit.tiers.files import atomic_write_json, load_tensors, read_json, recover_dir, replace_dir, save_tensors
from memfit.tiers.memory import current_bytes, peak_bytes, reset_peak
from memfit.train.callbacks import Callback
from memfit.train.config import TrainConfig
from memfit.train.metrics import MetricsLog
from memfit.train.progress import TrainProgress
from memfit.train.tasks import EvalState, Task
from memfit.train.zo import PairedForward

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class Ranks:
    """Where this process computes and its place among the ranks of the run (one rank without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """Sum of `value` over all ranks (a collective under torchrun; the value itself on one rank)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


Example = dict[str, list[int]]
SaveModel = Callable[[nn.Module, Path], None]


def make_optimizer(cfg: TrainConfig, named_params: list[tuple[str, nn.Parameter]],
                   out_dir: Path) -> torch.optim.Optimizer:
    """The optimizer `cfg` asks for over the trainable parameters (the trainer's, and the memory planner's)."""
    extra = {"offload-disk": {"path": out_dir / "optimizer-swap"},
             "mezo": {"eps": cfg.zo_eps, "perturbations": cfg.zo_perturbations, "sparsity": cfg.zo_sparsity,
                      "seed": cfg.seed}}
    chosen = {"rank": cfg.proj_rank, "update_proj_gap": cfg.proj_gap, "scale": cfg.proj_scale}
    projected = {"states": cfg.proj_states, "embeddings": cfg.proj_embeddings,
                 **{k: v for k, v in chosen.items() if v is not None}}
    extra.update({name: projected for name in PROJECTED})
    return build_optimizer(cfg.optim, named_params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           **extra.get(cfg.optim, {}))


def checkpoint_dir(out_dir: str | Path) -> Path:
    """The checkpoint a resumed run continues from (restored if a save was cut between its renames)."""
    path = recover_dir(Path(out_dir) / CHECKPOINT)
    if not path.is_dir():
        raise CheckpointError(f"nothing to resume: {path} does not exist. Run without --resume to start.")
    return path


def _due(every: int, step: int, end_of_epoch: bool) -> bool:
    """Whether a periodic action (eval, checkpoint) runs now: every `every` updates, or per epoch if 0."""
    return step % every == 0 if every else end_of_epoch


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """LR factor: linear warmup over `warmup` updates, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Trainer:
    """Trains the parameters of `model` that require grad on `train_set`; see the module docstring.

    save_model(model, dir): writes what training produced (an adapter, a compressed model) to `dir`; used
        for checkpoints and the final artifact. Under FSDP2 every rank calls it (it may gather).
    """

    def __init__(self, model: nn.Module, task: Task, train_set: list[Example], eval_set: list[Example] | None,
                 config: TrainConfig, out_dir: str | Path, pad_id: int, save_model: SaveModel,
                 callbacks: list[Callback] | None = None, ranks: Ranks | None = None,
                 quiet: bool = False) -> None:
        if not train_set:
            raise ConfigError("the training set is empty after encoding; check --data.")
        self.model, self.task, self.config = model, task, config
        self.train_set, self.eval_set = train_set, eval_set or []
        self.out_dir, self.pad_id, self.save_model = Path(out_dir), pad_id, save_model
        self.callbacks = list(callbacks or [])
        self.ranks = ranks or Ranks(torch.device("cpu"))
        self.quiet = quiet
        self.console = Console(quiet=quiet or not self.ranks.main)
        self.steps_per_epoch = len(self._epoch_groups(0))
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(train_set)} examples do not fill one batch of {config.batch_size} on each of "
                              f"{self.ranks.world_size} ranks; lower --batch-size or add data.")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ConfigError("the model has no trainable parameters; inject an adapter or unfreeze a module.")
        self.optimizer = self._build_optimizer()
        self.zeroth_order = getattr(self.optimizer, "zeroth_order", False)
        stream = getattr(model, "memfit_stream", None)
        self.paired = PairedForward(model, self.optimizer.params, stream) if self.zeroth_order and stream else None
        warmup = math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.total_steps, warmup))
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.ranks.main)
        self.memory: dict[str, int] = {}

    # -- setup ----------------------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.config, list(self.params.items()), self.out_dir)

    def _epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of `epoch` (example indices), grouped into updates."""
        n, bs, world = len(self.train_set), self.config.batch_size, self.ranks.world_size
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        span = bs * world
        stop = n - n % span if world > 1 else n  # ranks must run the same number of micro-batches
        batches = [order[i:i + span][self.ranks.rank * bs:(self.ranks.rank + 1) * bs] for i in range(0, stop, span)]
        accum = self.config.grad_accum
        return [batches[i:i + accum] for i in range(0, len(batches), accum)]

    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = self.task.collate(examples, self.pad_id)
        return {k: v.to(self.ranks.device, non_blocking=True) for k, v in batch.items()}

    # -- training ---------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `total_steps`; returns the final metrics. resume=True continues from out_dir/checkpoint."""
        if resume:
            self.load_checkpoint()
            self.console.print(f"resuming from update {self.global_step} of {self.total_steps} "
                               f"(checkpoint in {self.out_dir / CHECKPOINT})", highlight=False)
        else:
            self.metrics.reset()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.metrics.log({"event": "start", "step": self.global_step, "total_steps": self.total_steps,
                          "resumed": resume, "config": self.config.to_dict()})
        start, progress = time.perf_counter(), TrainProgress(self.total_steps, self.global_step, self.quiet
                                                             or not self.ranks.main)
        window: list[float] = []
        examples = 0
        reset_peak(self.ranks.device)
        try:
            with progress:
                for step_loss, n_examples in self._updates():
                    window.append(step_loss)
                    examples += n_examples
                    rate = examples / max(1e-9, time.perf_counter() - start)
                    progress.update(self.global_step, step_loss, rate, peak_bytes(self.ranks.device))
                    self._after_update(window, rate)
        except KeyboardInterrupt:
            if self.global_step > 0:
                self.save_checkpoint()
            raise
        final = self.evaluate() if self.eval_set else {}
        extra: dict[str, Any] = {}
        for cb in self.callbacks:
            extra.update(cb.on_train_end(self))
        self.save_model(self.model, self.out_dir)
        summary = {"event": "end", "step": self.global_step, "train_time_s": time.perf_counter() - start,
                   "peak_mem_bytes": peak_bytes(self.ranks.device), **{f"eval_{k}": v for k, v in final.items()},
                   **extra}
        self.metrics.log(summary)
        self.metrics.plot(self.out_dir / "loss.png")
        return summary

    def _after_update(self, window: list[float], rate: float) -> None:
        step, cfg = self.global_step, self.config
        if step % cfg.log_every == 0 or step == self.total_steps:
            self.metrics.log({"event": "train", "step": step, "epoch": self.epoch, "loss": sum(window) / len(window),
                              "lr": self.optimizer.param_groups[0]["lr"], "examples_per_s": rate,
                              "peak_mem_bytes": peak_bytes(self.ranks.device)})
            window.clear()
        if step == self.total_steps:
            return  # the end of fit evaluates and saves
        end_of_epoch = self.step_in_epoch == 0
        if self.eval_set and _due(cfg.eval_every, step, end_of_epoch):
            self.evaluate()
        if _due(cfg.checkpoint_every, step, end_of_epoch):
            self.save_checkpoint()

    def _updates(self) -> Iterator[tuple[float, int]]:
        """Run updates until total_steps; yields (mean loss per target, examples) of each update."""
        while self.global_step < self.total_steps:
            groups = self._epoch_groups(self.epoch)
            for micro in groups[self.step_in_epoch:]:
                result = self._update(micro)
                self.step_in_epoch += 1
                if self.step_in_epoch == len(groups):  # the position is final before anyone checkpoints it
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                yield result
                if self.global_step >= self.total_steps:
                    return

    def _update(self, micro: list[list[int]]) -> tuple[float, int]:
        self.model.train()
        batches = [self._batch([self.train_set[i] for i in idx]) for idx in micro]
        n_targets = self.ranks.sum(sum(self.task.targets(b) for b in batches))
        if n_targets == 0:
            raise TrainingError(f"update {self.global_step + 1} has no loss targets (every completion was cut by "
                                f"--max-length {self.config.max_length}?); raise --max-length.")
        if self.global_step == 0:  # the first update's peak above what was held before it: its activations
            self.memory["before_step"] = current_bytes(self.ranks.device)
        if self.zeroth_order:
            mean = self._zeroth_order_step(batches, n_targets)
        else:
            mean = self._backprop_step(batches, n_targets)
        self.scheduler.step()
        self.global_step += 1
        for cb in self.callbacks:
            cb.on_step_end(self, self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.global_step == 1:
            self.memory["step_peak"] = peak_bytes(self.ranks.device)
        return mean, sum(len(idx) for idx in micro) * self.ranks.world_size

    def _backprop_step(self, batches: list[dict[str, torch.Tensor]], n_targets: float) -> float:
        total, checked = 0.0, 0.0
        for batch in batches:
            loss_sum = self.task.loss_sum(self.model, batch)
            total += loss_sum.item()
            loss = loss_sum * (self.ranks.world_size / n_targets)
            for cb in self.callbacks:
                loss = cb.loss(self, loss)
            checked += loss.item()
            loss.backward()
        # Checked on the sum over ranks, so every rank stops together; NaN gradients never reach the weights.
        self._check_finite(self.ranks.sum(checked), "loss")
        if self.config.max_grad_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]  # callbacks may add some
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            self._check_finite(float(norm), "gradient norm")
        self.optimizer.step()
        return self.ranks.sum(total) / n_targets

    def _zeroth_order_step(self, batches: list[dict[str, torch.Tensor]], n_targets: float) -> float:
        """One MeZO step: forward passes only (no graph, no `.grad`), in eval mode so that both perturbed passes
        compute the same function (no dropout), as MeZO does. Returns the mean of the perturbed losses."""
        self.model.eval()
        if self.paired is not None:  # streamed layers: both passes in one visit of each layer (ZO2)
            loss = self.optimizer.step(paired=lambda z: self.paired.losses(z, self.task, batches, n_targets))
        else:
            loss = self.optimizer.step(lambda: sum(float(self.task.loss_sum(self.model, b)) for b in batches)
                                       / n_targets)
        return float(loss)

    def _check_finite(self, value: float, what: str) -> None:
        """Stop before a non-finite value reaches the weights: the optimizer step would spread it everywhere."""
        if math.isfinite(value):
            return
        last = self.out_dir / CHECKPOINT
        hint = f"; the last checkpoint is in {last} (continue with --resume)" if last.is_dir() else ""
        raise TrainingError(f"the {what} is {value} at update {self.global_step + 1} "
                            f"(lr {self.optimizer.param_groups[0]['lr']:.3g}). Lower --lr (now {self.config.lr:g}) "
                            f"or check the data{hint}.")

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the eval set (every rank evaluates all of it, so FSDP2's collectives line up)."""
        self.model.eval()
        state = EvalState()
        order = sorted(range(len(self.eval_set)), key=lambda i: len(self.eval_set[i]["input_ids"]))
        bs = self.config.eval_batch_size
        for s in range(0, len(order), bs):
            self.task.loss_sum(self.model, self._batch([self.eval_set[i] for i in order[s:s + bs]]), state)
        metrics = self.task.metrics(state)
        self.metrics.log({"event": "eval", "step": self.global_step, "epoch": self.epoch, **metrics})
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "total_steps": self.total_steps, "world_size": self.ranks.world_size,
                "config": self.config.to_dict(), "scheduler": self.scheduler.state_dict()}

    def _rank_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's RNG state and the callbacks' state, split into tensors and JSON."""
        tensors = {"rng.cpu": torch.get_rng_state()}
        if self.ranks.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.ranks.device)
        json_state: dict[str, Any] = {}
        for i, cb in enumerate(self.callbacks):
            for key, value in cb.state_dict().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"callback{i}.{key}"] = value
                else:
                    json_state[f"callback{i}.{key}"] = value
        return tensors, json_state

    def save_checkpoint(self) -> Path:
        """Write out_dir/checkpoint atomically: the model's trained state, optimizer, schedule, RNG, callbacks."""
        path = self.out_dir / CHECKPOINT
        tensors, callback_json = self._rank_tensors()
        state = {**self._state(), "callbacks": callback_json}
        if self.ranks.world_size > 1:
            from memfit.train import distributed

            def extra(directory: Path) -> None:
                save_tensors(directory / f"rank{self.ranks.rank}.safetensors", tensors)

            distributed.save_checkpoint(path, self.model, self.optimizer, meta=state, write_extra=extra)
            return path
        with replace_dir(path) as tmp:
            self.save_model(self.model, tmp / "model")
            save_optimizer(self.optimizer, tmp / "optimizer")
            save_tensors(tmp / "rank0.safetensors", tensors)
            atomic_write_json(tmp / STATE_FILE, state)
        return path

    def load_checkpoint(self) -> None:
        """Continue from out_dir/checkpoint. The model must already carry the checkpoint's trained state
        (`finetune` loads `checkpoint/model` before building the trainer); this restores the rest."""
        path = checkpoint_dir(self.out_dir)
        if self.ranks.world_size > 1:
            from memfit.train import distributed

            state = distributed.load_checkpoint(path, self.model, self.optimizer)
        else:
            state = read_json(path / STATE_FILE)
        if state["world_size"] != self.ranks.world_size:
            raise CheckpointError(f"{path} was written by {state['world_size']} rank(s), this run has "
                                  f"{self.ranks.world_size}; resume with the same number of processes.")
        saved = TrainConfig.from_dict(state["config"])
        if saved != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in saved.to_dict().items() if getattr(self.config, k) != v}
            raise CheckpointError(f"the checkpoint in {path} was trained with other settings {diff} "
                                  "(saved, now); resume with the same settings.")
        tensors = load_tensors(path / f"rank{self.ranks.rank}.safetensors")
        for i, cb in enumerate(self.callbacks):
            prefix = f"callback{i}."
            saved = {**tensors, **state["callbacks"]}
            cb.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, self)
        if self.ranks.world_size == 1:
            load_optimizer(self.optimizer, path / "optimizer")
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.ranks.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.ranks.device)
        self.global_step, self.epoch, self.step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        self.metrics.truncate(self.global_step)
