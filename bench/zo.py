"""Zeroth-order fine-tuning (MeZO) against backprop at the same wall-clock budget, on two real models.

Tasks (the shipped debian-sections data):
- MiniLM-L6 classifying the synopses into 14 sections (a new head; accuracy on the validation split);
- SmolLM2-135M-Instruct answering "Which Debian archive section is this package in? Package: <synopsis>" with the
  section as the completion (LoRA / full on the LM; exact match of the greedy answer on 200 validation prompts, and
  the completion loss).

Rows: the untrained model (zero-shot, for the LM) or Adam on the head only (MiniLM); MeZO on LoRA r=8 (query and
value, plus the new head on MiniLM); MeZO on every weight (`--method full`); Adam on LoRA r=8 (the backprop
reference). Every trained row gets the same wall-clock budget: two short calibration runs (fresh processes, c and 2c
updates) measure its marginal seconds per update, and the row then runs as many updates as fill the budget (so the
LR schedule is the row's own).
Each row runs in a fresh process, so its peak RSS (VmHWM since training started: weights, activations, gradients,
states) is its own. "forward passes" counts model forwards in training (MeZO: 2 per update; Adam: 1, plus a
backward). Learning rates are the MeZO paper's ranges, picked once on MiniLM (see the README), not tuned per row.

Rows are appended to results/zo.json as they finish and a rerun skips them (`--fresh` starts over), so the run can
be stopped and continued.

    .venv/bin/python bench/zo.py            # ~90 min on 2 CPU cores: 2.5 min per MiniLM row, 8 per SmolLM2 row,
                                            # calibrations, evaluations, sweeps and the memory rows
    .venv/bin/python bench/zo.py --quick    # 20 s / 40 s budgets, 50 validation prompts: a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, heldout_loss, machine, md_table, smollm2_dir  # noqa: E402
from _sections import exact_match, jsonl_rows, prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "zo-bench"
GiB = 2**30

# (task, row) -> how the row trains. MeZO's lr: on MiniLM, 600 updates of LoRA at 1e-4 / 1e-3 / 1e-2 reached val
# loss 2.640 / 2.619 / 2.449 (ln 14 = 2.639), so 1e-2; the others scale it by the ratio of trained dimensions (the
# estimate's variance grows with them), within the paper's ranges (1e-4 LoRA, 1e-6..1e-7 all weights, ε 1e-3).
ROWS: dict[str, dict[str, dict]] = {
    "minilm": {
        "head only (Adam)": {"method": "head", "optim": "adamw", "lr": 1e-3},
        "MeZO LoRA": {"method": "lora", "optim": "mezo", "lr": 1e-2},
        "MeZO full": {"method": "full", "optim": "mezo", "lr": 3e-5},
        "Adam LoRA": {"method": "lora", "optim": "adamw", "lr": 1e-3},
        "MeZO LoRA, 4x budget": {"method": "lora", "optim": "mezo", "lr": 1e-2, "budget_x": 4},
    },
    "smollm2": {
        "zero-shot": {"method": None},
        "MeZO LoRA": {"method": "lora", "optim": "mezo", "lr": 1e-4},  # 1e-3 diverged (see the sweep)
        "MeZO full": {"method": "full", "optim": "mezo", "lr": 1e-6},
        "Adam LoRA": {"method": "lora", "optim": "adamw", "lr": 1e-3},
        "zero-shot, chat prompt": {"method": None, "prompt": "chat"},
        "MeZO LoRA, chat prompt": {"method": "lora", "optim": "mezo", "lr": 1e-4, "prompt": "chat"},
    },
}
BATCH = {"minilm": 16, "smollm2": 8, "memory": 16}
# Peak memory where activations matter: SmolLM2 at batch 16 x 256 tokens (synopses joined into long texts), a few
# updates each; memory only, no evaluation.
MEMORY_ROWS = {"MeZO LoRA": ("lora", "mezo"), "Adam LoRA": ("lora", "adamw"), "MeZO full": ("full", "mezo"),
               "Adam full": ("full", "adamw")}
MEMORY_STEPS, MEMORY_LENGTH = 3, 256
ROWS["memory"] = {name: {"method": m, "optim": o, "lr": 1e-6 if o == "mezo" else 1e-5}
                  for name, (m, o) in MEMORY_ROWS.items()}
CALIBRATION_STEPS = {"minilm": 12, "smollm2": 3}


def _data(task: str, quick: bool, style: str = "plain") -> tuple[Path, Path, Path]:
    """(model dir, train file, validation file) of a task, written once under runs/zo-bench."""
    from memfit.cli.demo import DATA, minilm_dir
    from memfit.local import load_tokenizer

    if task == "minilm":
        return minilm_dir(), DATA / "debian-sections-train.jsonl", DATA / "debian-sections-val.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir(WORK)
    if task == "memory":
        long = WORK / "lm-long.jsonl"
        if not long.is_file():
            texts = [r["text"] for r in jsonl_rows(DATA / "debian-sections-train.jsonl")[:2000]]
            long.write_text("".join(json.dumps({"text": ". ".join(texts[i:i + 40])}) + "\n"
                                    for i in range(0, len(texts), 40)))
        return model_dir, long, long
    tokenizer = load_tokenizer(model_dir)
    suffix = "" if style == "plain" else f"-{style}"
    train, val = WORK / f"lm-train{suffix}.jsonl", WORK / f"lm-val{suffix}{'-quick' if quick else ''}.jsonl"
    for src, dst, n in ((DATA / "debian-sections-train.jsonl", train, None),
                        (DATA / "debian-sections-val.jsonl", val, 50 if quick else 200)):
        if not dst.is_file():
            rows = jsonl_rows(src)[:n]
            dst.write_text("".join(json.dumps({"prompt": prompt(r["text"], style, tokenizer),
                                               "completion": r["label"]}) + "\n" for r in rows))
    return model_dir, train, val


def _head_only(model_dir: Path, train: Path, val: Path, out: Path, cfg) -> dict:
    """Adam on the new classification head alone, the encoder frozen (a linear probe)."""
    from memfit.local import load_tokenizer
    from memfit.train.data import label_names, load_rows
    from memfit.train.finetune import load_base
    from memfit.train.tasks import Classify
    from memfit.train.trainer import Trainer

    rows = load_rows(train, "classify")[0]
    task = Classify(label_names(rows))
    tokenizer = load_tokenizer(model_dir)
    model = load_base(model_dir, task)[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    encode = lambda rs: [task.encode(r, tokenizer, cfg.max_length) for r in rs]  # noqa: E731
    evals = encode(load_rows(val, "classify")[0]) if val is not None else None
    trainer = Trainer(model, task, encode(rows), evals, cfg, out, tokenizer.pad_token_id, lambda m, d: None,
                      quiet=True)
    return trainer.fit()


def run_row(task: str, row: str, steps: int, quick: bool, lr: float | None = None, evaluate: bool = True) -> dict:
    """One row in this process: `steps` updates (a calibration run when asked for few), then the evaluation."""
    import torch

    import memfit
    from memfit.local import load_tokenizer
    from memfit.tiers.memory import peak_rss_bytes, reset_peak_rss
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune, load_base, load_finetuned
    from memfit.train.tasks import CausalLM

    torch.set_num_threads(2)
    spec = {**ROWS[task][row], **({"lr": lr} if lr else {})}
    model_dir, train, val = _data(task, quick, spec.get("prompt", "plain"))
    slug = "".join(c for c in row.replace(" ", "-") if c.isalnum() or c == "-")
    out = WORK / task / slug / f"{steps}-{spec.get('lr')}"
    if spec["method"] is None:  # zero-shot: the model as it is
        reset_peak_rss()
        model = load_base(model_dir, CausalLM())[0].eval()
        tokenizer = load_tokenizer(model_dir)
        return {"steps": 0, "exact_match": exact_match(model, tokenizer, val), "peak_rss": peak_rss_bytes(),
                "loss": heldout_loss(model, tokenizer, val), "train_time_s": 0.0, "forward_passes": 0}
    batch = BATCH[task]
    cfg = TrainConfig(max_steps=steps, batch_size=batch, eval_batch_size=batch, lr=spec["lr"], optim=spec["optim"],
                      warmup_ratio=0.0 if spec["optim"] == "mezo" else 0.06,
                      max_length=MEMORY_LENGTH if task == "memory" else 64, log_every=10**9,
                      checkpoint_every=10**9, eval_every=10**9, seed=0)
    if spec["method"] == "head":
        summary = _head_only(model_dir, train, val if evaluate else None, out, cfg)
    else:
        config = {"lora": memfit.LoraConfig(r=8, alpha=16), "full": memfit.FullConfig()}[spec["method"]]
        summary = finetune(model_dir, train, out, config, cfg, eval_data=val if evaluate and task != "memory" else None,
                           quiet=True, overwrite=True)
    held = summary.get("memory", {}).get("before_step")  # RSS when the first update started: process + weights
    result = {"steps": steps, "train_time_s": summary["train_time_s"], "peak_rss": summary["peak_mem_bytes"],
              "rss_before_training": held,
              "forward_passes": steps * (2 if spec["optim"] == "mezo" else 1),
              **{k[5:]: v for k, v in summary.items() if k.startswith("eval_")}}
    if evaluate and task == "smollm2":
        result["exact_match"] = exact_match(load_finetuned(out), load_tokenizer(model_dir), val)
    return result


def _subprocess(task: str, row: str, steps: int, quick: bool, lr: float | None = None, evaluate: bool = True
                ) -> dict:
    cmd = [sys.executable, __file__, "--row", f"{task}:{row}", "--steps", str(steps)] + (["--quick"] if quick else [])
    cmd += (["--lr", str(lr)] if lr else []) + ([] if evaluate else ["--calibrate"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task}:{row} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibrated_steps(task: str, row: str, budget: float, quick: bool) -> int:
    """Updates that fill `budget` seconds: the marginal time of an update, from two short runs (c and 2c updates;
    their difference leaves out what only the first updates cost: allocation, kernel warm-up)."""
    c = CALIBRATION_STEPS[task]
    short, long = (_subprocess(task, row, n, quick, evaluate=False)["train_time_s"] for n in (c, 2 * c))
    per_step = max(long - short, 1e-3) / c
    first = max(0.0, short - c * per_step)
    return max(2 * c, int((budget - first) / per_step))


def _failed(error: Exception) -> dict:
    """A row that could not finish (a NaN loss at its learning rate, say): recorded, not fatal."""
    return {"error": str(error).strip().splitlines()[-1][:300]}


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/zo.json alone (bench/readme_check.py compares the two)."""
    rows = []
    for task, results in payload["results"].items():
        if task == "memory":
            continue
        model = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M"}[task]
        metric = "accuracy" if task == "minilm" else "exact_match"
        for name in ROWS[task]:
            r = results.get(name)
            if r is None:
                continue
            if "error" in r:
                rows.append([model, name, "failed", "", "", "", "", r["error"][:60]])
                continue
            loss = r.get("loss")
            rows.append([model, name, f"{r[metric]:.3f}", f"{loss:.3f}" if loss is not None else "",
                         f"{r['peak_rss'] / GiB:.2f}", f"{r['train_time_s'] / 60:.1f}", str(r["steps"]),
                         f"{r['forward_passes']:,}"])
    header = ["model", "row", "accuracy / exact match", "val loss", "peak RSS GiB", "train min", "updates",
              "forward passes"]
    tables = {"zo": md_table(header, "llrrrrrr", rows)}
    memory = payload["results"].get("memory", {})
    ref = memory.get("Adam LoRA", {}).get("peak_rss")
    if ref:
        mem_rows = [[name, f"{r['peak_rss'] / GiB:.2f}", f"{r['peak_rss'] / ref:.2f}",
                     f"{(r['peak_rss'] - r['rss_before_training']) / GiB:.2f}", f"{r['train_time_s'] / r['steps']:.1f}"]
                    for name, r in memory.items() if "error" not in r]
        tables["memory"] = md_table(["SmolLM2, batch 16 x 256", "peak RSS GiB", "÷ Adam LoRA",
                                     "above RSS at update 1, GiB", "s/update"], "lrrrr", mem_rows)
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    ap.add_argument("--fresh", action="store_true", help="start over instead of skipping finished rows")
    ap.add_argument("--budget-minilm", type=float, default=150.0, help="seconds of training per MiniLM row")
    ap.add_argument("--budget-smollm2", type=float, default=480.0, help="seconds of training per SmolLM2 row")
    ap.add_argument("--tasks", default="minilm,smollm2,memory")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", help="TASK:ROW: try --sweep-lrs for --sweep-steps updates each, record them, and stop")
    ap.add_argument("--sweep-lrs", default="1e-4,1e-5")
    ap.add_argument("--sweep-steps", type=int, default=60)
    args = ap.parse_args()
    if args.row:  # the child process of one row
        task, row = args.row.split(":", 1)
        print(json.dumps(run_row(task, row, args.steps, args.quick, args.lr, not args.calibrate)))
        return
    budgets = {"minilm": 20.0, "smollm2": 40.0} if args.quick else {"minilm": args.budget_minilm,
                                                                     "smollm2": args.budget_smollm2}
    budgets["memory"] = 0.0
    path = RESULTS / ("zo-quick.json" if args.quick else "zo.json")
    payload = json.loads(path.read_text()) if path.is_file() and not args.fresh else {"results": {}}
    payload.update(machine=machine(), budgets_s=budgets, quick=args.quick)
    start = time.perf_counter()
    if args.sweep:
        task, row = args.sweep.split(":", 1)
        sweep = payload.setdefault("sweeps", {}).setdefault(args.sweep, {})
        for lr in map(float, args.sweep_lrs.split(",")):
            try:
                sweep[str(lr)] = _subprocess(task, row, args.sweep_steps, args.quick, lr)
            except RuntimeError as e:
                sweep[str(lr)] = _failed(e)
            path.write_text(json.dumps(payload, indent=2) + "\n")
            print(f"sweep {args.sweep} lr {lr}: {json.dumps(sweep[str(lr)])}", flush=True)
        return
    for task in args.tasks.split(","):
        done = payload["results"].setdefault(task, {})
        for row, spec in ROWS[task].items():
            if row in done and "error" not in done[row]:
                continue
            steps, budget = 0, budgets[task] * spec.get("budget_x", 1)
            try:
                if task == "memory":
                    steps = MEMORY_STEPS
                elif spec["method"] is not None:
                    steps = calibrated_steps(task, row, budget, args.quick)
                done[row] = {**_subprocess(task, row, steps, args.quick), "budget_s": budget, **spec}
            except RuntimeError as e:
                done[row] = {**_failed(e), "budget_s": budget, **spec}
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(payload, indent=2) + "\n")
            print(f"{task} {row}: {json.dumps(done[row])}  [{(time.perf_counter() - start) / 60:.1f} min]", flush=True)
    for key, table in readme_tables(payload).items():
        print(f"<!-- results/{path.name}: {key} -->\n{table}\n<!-- /results -->")


if __name__ == "__main__":
    main()
