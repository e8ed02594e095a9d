"""Quality at equal parameter budgets: every method on two real tasks, with error bars.

Task `sections` (default): the pretrained MiniLM-L6 encoder classifies Debian package synopses into 14
sections (data/debian-sections-*.jsonl), with a new linear head on the pooled output, trained fully; the
metrics are validation accuracy and macro-F1. Task `lm`: the small Llama that bench/make_lm.py pretrains on
Python docstrings is adapted to the same synopses as text (causal LM, another domain); the metric is the
validation loss per token (and its perplexity), lower is better.

Same model, data, head, epochs, batch size, schedule (linear warmup 6%, linear decay) and target modules
(attention query and value, where a method has targets) for all methods of a task. The learning rate of
each method is chosen by a small sweep (`lrs` below, grown by a step while the best is at its edge) on a dev
split held out from the *training* file (its last 1,000 rows; the sweep trains on the rest for as many updates
as a final run makes, one seed, so the rate chosen is the best one for that length): the validation split is
never used for choosing anything. The classifier head has its own learning rate, the one the frozen encoder's
sweep chose (run first), the same for every method: a method's rate no longer trains its head further. Final
runs train on the whole training file with `--seeds` seeds and report the validation metrics as mean ± std.

    .venv/bin/python bench/quality.py            # full: every method, 3 seeds (~1.5 h on 2 cores, estimated)
        # resumable: each finished run is kept in runs/quality/, and the same command continues where it stopped
    .venv/bin/python bench/quality.py --quick    # 5 methods, 1 seed, 4,000 training rows, no sweep (<10 min)
    .venv/bin/python bench/quality.py --replot   # redraw table and plot from results/quality.json
    .venv/bin/python bench/make_lm.py && .venv/bin/python bench/quality.py --task lm   # ~9 + ~55 min

Writes results/quality[-lm].json, results/quality[-lm].md and the plot docs/img/quality[-lm].png (the
metric vs trainable parameters, log scale); --quick and --only runs write to names ending -quick and -partial
instead, so they never replace the full table's results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, atomic_write, machine, md_table, print_readme_tables  # noqa: E402

if TYPE_CHECKING:  # torch and memfit load in the functions: importing this file (bench/readme_check.py) is cheap
    from torch import nn

    import memfit
    from memfit.train.data import Row

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
LM_MODEL = Path(__file__).resolve().parent.parent / "runs" / "lm-model"
MEMO_DIR = Path(__file__).resolve().parent.parent / "runs" / "quality"
MAX_LENGTH = 64  # tokens per example: every synopsis fits
# One sweep for every adapter. A first run swept (1e-3, 3e-3): every adapter chose the top, by 0.2-0.3 of dev
# accuracy over 1e-3, so the grid moved up; 3e-2 makes LoRA r=8 diverge (dev accuracy 0.19), so the best lies inside.
ADAPTER_LRS = (3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Setup:
    """One row of the table: how to adapt the loaded model (in place) and its LR sweep (--quick takes the middle).

    trains=False: the model is only evaluated (the reference of a task without a head: the base model as is).
    """

    name: str
    prepare: Callable[[nn.Module], None]
    lrs: tuple[float, ...] = ADAPTER_LRS
    quick: bool = False
    trains: bool = True
    notes: dict = field(default_factory=dict)

    @property
    def quick_lr(self) -> float:
        return self.lrs[len(self.lrs) // 2]


def _trainable_only(prefix: str | None) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(prefix is not None and name.startswith(prefix + "."))

    return prepare


def _full(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _adapter(config: memfit.AdapterConfig) -> Callable[[nn.Module], None]:
    import memfit

    return lambda model: memfit.inject(model, config)


def setups(task: Task) -> list[Setup]:
    import memfit

    targets, save = task.targets, [task.head] if task.head else []

    def lora(r: int) -> memfit.LoraConfig:
        return memfit.LoraConfig(r=r, alpha=2 * r, dropout=0.1, target_modules=targets, modules_to_save=save)

    def mos(r: int, r_eq: int, r_pri: int) -> memfit.MoSConfig:
        return memfit.MoSConfig(r=r, r_eq=r_eq, r_pri=r_pri, shards=4, alpha=2 * r, dropout=0.1,
                                target_modules=targets, modules_to_save=save)

    reference = (Setup("frozen encoder + head", _trainable_only(task.head), (1e-2, 3e-2, 1e-1), quick=True)
                 if task.head else Setup("base model, no training", _trainable_only(None), (0.0,), quick=True,
                                         trains=False))
    return [
        reference,
        Setup("full fine-tuning", _full, task.full_lrs),
        *[Setup(f"LoRA r={r}", _adapter(lora(r)), quick=r in (1, 8)) for r in (1, 2, 4, 8)],
        Setup("MoS, LoRA r=1 budget", _adapter(mos(4, 1, 0)), quick=True,
              notes={"r": 4, "r_eq": 1, "r_pri": 0, "shards": 4}),
        Setup("MoS, LoRA r=2 budget", _adapter(mos(6, 2, 1)), quick=True,
              notes={"r": 6, "r_eq": 2, "r_pri": 1, "shards": 4}),
        # Adaptive ranks at the rank-2 budget: IncreLoRA grows 1 -> 2 on average, AdaLoRA prunes 4 -> 2.
        Setup("IncreLoRA, rank-2 budget", _adapter(memfit.IncreLoRAConfig(
            init_rank=1, target_rank=2, alpha=4.0, dropout=0.1, target_modules=targets, modules_to_save=save)),
            notes={"init_rank": 1, "target_rank": 2}),
        Setup("AdaLoRA, rank-2 budget", _adapter(memfit.AdaLoRAConfig(
            init_rank=4, target_rank=2, alpha=8.0, dropout=0.1, target_modules=targets, modules_to_save=save)),
            notes={"init_rank": 4, "target_rank": 2}),
        # DiffFit and Compacter place themselves on block outputs (attention and MLP), not on the targets.
        Setup("DiffFit", _adapter(memfit.DiffFitConfig(modules_to_save=save))),
        Setup("Compacter", _adapter(memfit.CompacterConfig(modules_to_save=save)),
              notes={"n": 4, "reduction": 32}),
    ]


@dataclass(frozen=True)
class Task:
    """The model and data every configuration of a table trains on, and how they are scored."""

    name: str
    model_dir: Path
    train: list[Row]
    val: list[Row]
    labels: list[str] | None
    tokenizer: object
    targets: list[str]
    head: str | None  # a new module that trains fully beside every method (the classifier), or None
    metrics: tuple[str, ...]  # reported metrics; the first chooses the LR
    higher_is_better: bool
    full_lrs: tuple[float, float, float]  # the full fine-tuning sweep (adapters share ADAPTER_LRS)

    @staticmethod
    def load(model_dir: Path, data: Path, kind: str = "sections") -> Task:
        """`sections`: classify with an encoder; `lm`: the same synopses as text for a causal LM."""
        from memfit.local import load_tokenizer
        from memfit.train.data import label_names, load_rows

        mode = "classify" if kind == "sections" else "causal-lm"
        train, _ = load_rows(data / "debian-sections-train.jsonl", mode)
        val, _ = load_rows(data / "debian-sections-val.jsonl", mode)
        tokenizer = load_tokenizer(model_dir)
        if kind == "sections":
            return Task(kind, model_dir, train, val, label_names(train), tokenizer, ["query", "value"], "classifier",
                        ("accuracy", "macro_f1"), True, (1.5e-4, 5e-4, 1.5e-3))
        return Task(kind, model_dir, train, val, None, tokenizer, ["q_proj", "v_proj"], None, ("loss", "perplexity"),
                    False, (3e-4, 1e-3, 3e-3))

    def memfit_task(self):
        from memfit.train.tasks import CausalLM, Classify

        return Classify(self.labels) if self.labels is not None else CausalLM()

    def best(self, scores: dict[float, float]) -> float:
        return (max if self.higher_is_better else min)(scores, key=scores.get)


def _trainer(head: str | None, head_lr: float | None) -> type:
    """memfit's Trainer, or one whose AdamW trains the head (parameters under `head`) at `head_lr`."""
    from memfit.train.trainer import Trainer

    if head is None or head_lr is None:
        return Trainer

    class HeadRateTrainer(Trainer):
        def _build_optimizer(self):
            import torch

            if self.config.optim != "adamw":
                raise ValueError("a separate head rate is built for --optim adamw only")
            on_head = [n.startswith(head + ".") for n in self.params]
            groups = [{"params": [p for p, h in zip(self.params.values(), on_head, strict=True) if h == flag],
                       **({"lr": head_lr} if flag else {})} for flag in (False, True)]
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr,
                                     weight_decay=self.config.weight_decay)

    return HeadRateTrainer


class Memo:
    """Finished runs on disk (runs/quality/<results name>.json), written after each one, so the full table (hours
    on 2 cores) runs in several sittings: a rerun of the same command replays what is done and trains the rest.
    The key is everything a run depends on (row, rate, seed, rows, updates, head rate, model); a changed protocol
    misses and trains anew."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.runs = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.used: set[str] = set()  # the runs this table is made of (the file may hold other protocols' too)

    def __call__(self, key: dict, train: Callable[[], dict]) -> dict:
        if self.path is None:  # no file: nothing to resume (a library call, a test)
            return train()
        k = json.dumps(key, sort_keys=True)
        self.used.add(k)
        if k not in self.runs:
            self.runs[k] = train()
            atomic_write(self.path, json.dumps(self.runs, indent=1) + "\n")
        return self.runs[k]

    def seconds(self) -> float:
        """What the runs used so far cost, over every sitting."""
        return sum(self.runs[k].get("wall_s", 0.0) for k in self.used)


MEMO = Memo(None)  # main() points it at the run's file


def run(setup: Setup, lr: float, seed: int, data: Task, epochs: int, train: list[Row] | None = None,
        val: list[Row] | None = None, steps: int | None = None, head_lr: float | None = None) -> dict:
    """`train_and_score`, or its result from an earlier sitting (`MEMO`)."""
    train, val = train or data.train, val or data.val
    key = {"row": setup.name, "lr": lr, "seed": seed, "epochs": epochs, "steps": steps, "head_lr": head_lr,
           "model": str(data.model_dir), "train": _digest(train), "val": _digest(val)}

    def timed() -> dict:
        start = time.perf_counter()
        result = train_and_score(setup, lr, seed, data, epochs, train, val, steps, head_lr)
        return {**result, "wall_s": time.perf_counter() - start}

    return MEMO(key, timed)


def _digest(rows: list[Row]) -> str:
    return hashlib.sha256(json.dumps([r.data for r in rows], sort_keys=True).encode()).hexdigest()[:16]


def train_and_score(setup: Setup, lr: float, seed: int, data: Task, epochs: int, train: list[Row] | None = None,
                    val: list[Row] | None = None, steps: int | None = None, head_lr: float | None = None) -> dict:
    """Train one configuration (on `train`, default the whole training file; `steps` updates, default `epochs`
    epochs) and score it on `val` (default the validation file); the head learns at `head_lr` (default: the
    method's `lr`). Returns the metrics, parameter counts, time per epoch and peak memory."""
    import torch

    from memfit.adapters import get_method
    from memfit.train.allocation import AllocatorCallback
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import load_base

    task, tokenizer = data.memfit_task(), data.tokenizer
    torch.manual_seed(seed)
    model = load_base(data.model_dir, task)[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    setup.prepare(model)
    head = sum(p.numel() for n, p in model.named_parameters() if data.head and n.startswith(data.head + "."))
    encode = lambda rows: [task.encode(r, tokenizer, MAX_LENGTH) for r in rows]  # noqa: E731
    if not setup.trains:
        return {**evaluate(model, task, encode(val or data.val), tokenizer.pad_token_id), "lr": lr, "seed": seed,
                "adapter_params": 0, "head_params": 0, "epoch_s": 0.0, "peak_mem_bytes": 0}
    config = TrainConfig(epochs=epochs, max_steps=steps, batch_size=32, eval_batch_size=128, lr=lr, seed=seed,
                         max_length=MAX_LENGTH, checkpoint_every=10**9, log_every=50)
    method = get_method(model.memfit_config.method) if hasattr(model, "memfit_config") else None
    callbacks = [AllocatorCallback()] if method and method.allocator else []  # rank allocators
    with tempfile.TemporaryDirectory(prefix="memfit-quality-") as out:
        trainer = _trainer(data.head, head_lr)(model, task, encode(train or data.train), encode(val or data.val),
                                               config, out, tokenizer.pad_token_id, callbacks=callbacks,
                                               save_model=lambda m, d: None, quiet=True)
        summary = trainer.fit()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # at the end: IncreLoRA grows
    return {**{k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")}, "lr": lr,
            "seed": seed, "adapter_params": trainable - head, "head_params": head,
            "epoch_s": summary["train_time_s"] / (trainer.total_steps / trainer.steps_per_epoch),
            "peak_mem_bytes": summary["peak_mem_bytes"]}


def evaluate(model: nn.Module, task, examples: list[dict], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """The task's metrics of a model that does not train (the same loss sums as the trainer's evaluation)."""
    import torch

    from memfit.train.tasks import EvalState

    with torch.no_grad():
        model.eval()
        state = EvalState()
        for s in range(0, len(examples), batch_size):
            task.loss_sum(model, task.collate(examples[s:s + batch_size], pad_id), state)
        return task.metrics(state)


def updates(rows: int, epochs: int, batch_size: int = 32) -> int:
    """The updates of a final run: the batches of its epochs (one process keeps a last, partial batch)."""
    return epochs * -(-rows // batch_size)


def sweep(setup: Setup, data: Task, epochs: int, steps: int, head_lr: float | None,
          extend: int = 2) -> tuple[float, dict]:
    """The LR with the best dev metric: trained for `steps` updates (a final run's) on the training file less its
    last 1,000 rows, scored on those.

    While the best LR is the highest (or lowest) tried, the grid grows one step that way, up to `extend` times,
    so the answer lies inside the grid (too high an LR diverges and scores badly, which stops the growth)."""
    dev, fit = data.train[-1000:], data.train[:-1000]

    def score(lr: float) -> float:  # the reference row's head rate is the one swept
        return run(setup, lr, 0, data, epochs, fit, dev, steps, head_lr or lr)[data.metrics[0]]

    scores = {lr: score(lr) for lr in setup.lrs}
    ratio = setup.lrs[-1] / setup.lrs[-2]
    for _ in range(extend):
        best = data.best(scores)
        if best == max(scores):
            lr = best * ratio
        elif best == min(scores):
            lr = best / ratio
        else:
            break
        scores[lr] = score(lr)
    return data.best(scores), dict(sorted(scores.items()))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict[str, dict], metrics: tuple[str, ...]) -> list[dict]:
    rows = []
    for name, res in results.items():
        first = res["runs"][0]
        rows.append({"method": name, "lr": res["lr"],
                     **{m: mean_std([r[m] for r in res["runs"]]) for m in metrics},
                     "adapter_params": first["adapter_params"], "head_params": first["head_params"],
                     "epoch_s": statistics.fmean(r["epoch_s"] for r in res["runs"]),
                     "peak_mem_bytes": max(r["peak_mem_bytes"] for r in res["runs"]), "seeds": len(res["runs"])})
    return rows


LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "loss": "val loss", "perplexity": "perplexity"}


def markdown(rows: list[dict], metrics: tuple[str, ...]) -> str:
    names = " | ".join(LABELS[m] for m in metrics)
    lines = [f"| method | adapter params | head params | lr | {names} | s/epoch | peak RSS |",
             "|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|---:|"]
    for r in rows:
        values = " | ".join(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in metrics)
        lines.append(f"| {r['method']} | {r['adapter_params']:,} | {r['head_params']:,} | {r['lr']:.3g} | {values} | "
                     f"{r['epoch_s']:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table of a run, from results/quality.json or results/quality-lm.json alone (bench/readme_check.py
    compares them). The LM table shows the loss only; the base model, which does not train, has no lr and no std."""
    rows = payload["rows"]
    if payload["task"] == "sections":
        return {"methods": markdown(rows, ("accuracy", "macro_f1")).rstrip("\n")}
    lines = []
    for r in rows:
        trained = bool(r["lr"])
        loss = f"{r['loss'][0]:.3f} ± {r['loss'][1]:.3f}" if trained else f"{r['loss'][0]:.3f}"
        lines.append([r["method"], f"{r['adapter_params']:,}", f"{r['lr']:.3g}" if trained else "", loss])
    return {"methods": md_table(["method", "adapter params", "lr", "val loss"], "lrrr", lines)}


def plot(rows: list[dict], path: Path, metric: str = "accuracy", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors, markers = iter(plt.get_cmap("tab10").colors), iter("sDv^P*Xhp<>d")
    lora = [r for r in rows if r["method"].startswith("LoRA r=") and r["adapter_params"]]
    if lora:  # the ranks as one curve: the baseline every other method is read against
        xs = [r["adapter_params"] + r["head_params"] for r in lora]
        ax.errorbar(xs, [r[metric][0] for r in lora], yerr=[r[metric][1] for r in lora], fmt="-o", capsize=3,
                    color=next(colors), label="LoRA r=" + ", ".join(r["method"].removeprefix("LoRA r=") for r in lora))
        for x, r in zip(xs, lora, strict=True):
            ax.annotate(r["method"].removeprefix("LoRA "), (x, r[metric][0]), xytext=(4, -10),
                        textcoords="offset points", fontsize=7)
    for r in rows:
        if r in lora:
            continue
        params = r["adapter_params"] + r["head_params"]
        if not params:  # nothing trained (the base model): a reference line
            ax.axhline(r[metric][0], color="gray", linestyle=":", label=r["method"])
            continue
        value, std = r[metric]
        ax.errorbar(params, value, yerr=std, fmt=next(markers), capsize=3, color=next(colors), label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head, log scale)")
    ax.set_ylabel(f"validation {LABELS[metric]}")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


TITLES = {"sections": "MiniLM-L6 on debian-sections: accuracy vs trainable parameters",
          "lm": "Docstring LM adapted to Debian synopses: validation loss vs trainable parameters"}


def main() -> None:
    from memfit.cli.demo import DATA, minilm_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TITLES), default="sections")
    ap.add_argument("--model", type=Path, default=None, help="default: MiniLM-L6 (sections), runs/lm-model (lm)")
    ap.add_argument("--quick", action="store_true", help="5 methods, 1 seed, 4,000 training rows, fixed LRs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only the methods whose name contains one of these")
    ap.add_argument("--plot", type=Path, default=None, help="default: docs/img/quality[-lm].png")
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from results/, no training")
    args = ap.parse_args()
    model_dir = args.model or (minilm_dir() if args.task == "sections" else LM_MODEL)
    if not (model_dir / "config.json").is_file():
        sys.exit(f"no model at {model_dir}; run bench/make_lm.py first.")
    data = Task.load(model_dir, DATA, args.task)
    suffix = "" if args.task == "sections" else f"-{args.task}"
    # a quick or partial run never replaces the full table's results (or its plot)
    suffix += "-quick" if args.quick else "-partial" if args.only else ""
    plot_path = args.plot or IMG / f"quality{suffix}.png"
    if args.replot:
        rows = json.loads((RESULTS / f"quality{suffix}.json").read_text())["rows"]
        print(markdown(rows, data.metrics))
        print_readme_tables(readme_tables, RESULTS / f"quality{suffix}.json")
        return plot(rows, plot_path, data.metrics[0], TITLES[args.task])
    every = setups(data)  # the first is the reference row: with a head, it sets the head's rate for every row
    chosen = [s for i, s in enumerate(every) if (s.quick or not args.quick) and (
        not args.only or (i == 0 and data.head) or any(o.lower() in s.name.lower() for o in args.only))]
    train, seeds = (data.train[:4000], [0]) if args.quick else (data.train, list(range(args.seeds)))
    steps = updates(len(train), args.epochs)
    results: dict[str, dict] = {}
    head_lr = None
    start = time.perf_counter()
    global MEMO
    MEMO = Memo(MEMO_DIR / f"quality{suffix}.json")
    if MEMO.runs:
        print(f"resuming: {len(MEMO.runs)} finished runs in {MEMO.path}", flush=True)
    for setup in chosen:
        lr, scores = ((setup.quick_lr, {}) if args.quick or not setup.trains
                      else sweep(setup, data, args.epochs, steps, head_lr))
        if setup is every[0] and data.head:
            head_lr = lr
        runs = [run(setup, lr, seed, data, args.epochs, train, head_lr=head_lr)
                for seed in (seeds if setup.trains else [0])]
        results[setup.name] = {"lr": lr, "head_lr": head_lr, "sweep_dev": scores, "runs": runs, "notes": setup.notes}
        value = mean_std([r[data.metrics[0]] for r in runs])
        print(f"{setup.name:28s} lr={lr:g} {data.metrics[0]}={value[0]:.3f}±{value[1]:.3f} "
              f"({time.perf_counter() - start:.0f}s elapsed)", flush=True)
    rows = summarize(results, data.metrics)
    table = markdown(rows, data.metrics)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), "task": args.task, "model": str(model_dir), "quick": args.quick,
               "epochs": args.epochs, "updates": steps, "head_lr": head_lr, "seeds": seeds,
               "train_rows": len(train), "val_rows": len(data.val),
               "rows": rows, "results": results, "total_s": MEMO.seconds()}
    atomic_write(RESULTS / f"quality{suffix}.json", json.dumps(payload, indent=2) + "\n")
    plot(rows, plot_path, data.metrics[0], TITLES[args.task])
    print(f"wrote {RESULTS / f'quality{suffix}.json'} and {plot_path}")
    print_readme_tables(readme_tables, RESULTS / f"quality{suffix}.json")


if __name__ == "__main__":
    main()
