"""Does 8-bit AdamW train as well as fp32 AdamW? A short real fine-tune, the same run with each optimizer.

MiniLM-L6 on the demo task (debian-sections), LoRA r=16 on every Linear of the encoder plus the new head, so
every trainable tensor but the biases is large enough (>= 4096 values) for 8-bit states. Same seed, batches,
schedule and hyperparameters; only the optimizer differs. Reports the final validation loss, accuracy and
macro-F1 of each, and the relative difference of the validation loss (the goal: within 1%).

    .venv/bin/python bench/optim_finetune.py              # 1 epoch per optimizer, ~6 min on 2 CPU cores
    .venv/bin/python bench/optim_finetune.py --max-steps 20   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report  # noqa: E402

OPTIMIZERS = ["adamw", "adamw8bit"]
README_LABELS = {"adamw": "torch AdamW (fp32 states)", "adamw8bit": "memfit AdamW8bit"}


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/optim_finetune.json alone (bench/readme_check.py compares the two)."""
    results = payload["results"]
    ref = results["adamw"]["eval_loss"]
    rows = [[README_LABELS.get(name, name), f"{r['eval_loss']:.4f}", f"{r['eval_accuracy']:.3f}",
             f"{r['eval_macro_f1']:.3f}", "" if name == "adamw" else f"{(r['eval_loss'] - ref) / ref:+.2%}"]
            for name, r in results.items()]
    header = ["optimizer", "val loss", "accuracy", "macro-F1", "val loss vs AdamW"]
    return {"finetune": md_table(header, "lrrrr", rows)}


def main() -> None:
    # memfit (and torch) load here: importing this file (bench/readme_check.py) stays cheap
    import memfit
    from memfit.cli.demo import DATA, minilm_dir
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (smoke runs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    adapter = memfit.LoraConfig(r=16, alpha=32, dropout=0.1, target_modules="all-linear",
                                modules_to_save=["classifier"])
    results = {}
    for optim in OPTIMIZERS:
        config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=32, eval_batch_size=128,
                             lr=args.lr, weight_decay=0.01, max_length=64, optim=optim, checkpoint_every=10**9)
        with tempfile.TemporaryDirectory(prefix="memfit-optim-ft-") as out:
            summary = finetune(minilm_dir(), DATA / "debian-sections-train.jsonl", out, adapter, config,
                               eval_data=DATA / "debian-sections-val.jsonl", task="classify", quiet=True)
        results[optim] = {k: summary[k] for k in ("eval_loss", "eval_accuracy", "eval_macro_f1", "step",
                                                   "train_time_s", "trainable_params")}
        print(f"{optim}: val loss {summary['eval_loss']:.4f}, accuracy {summary['eval_accuracy']:.3f}", flush=True)
    ref = results["adamw"]["eval_loss"]
    rows = [[name, r["eval_loss"], r["eval_accuracy"], r["eval_macro_f1"], f"{(r['eval_loss'] - ref) / ref:+.2%}",
             r["train_time_s"]] for name, r in results.items()]
    path = report("optim_finetune", f"MiniLM-L6 + LoRA r=16 (all Linear) on debian-sections, "
                  f"{results['adamw']['step']} updates, {results['adamw']['trainable_params']:,} trainable parameters",
                  ["optimizer", "val loss", "accuracy", "macro-F1", "loss vs adamw", "train s"], rows,
                  {"epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "results": results,
                   "relative_loss_difference": (results["adamw8bit"]["eval_loss"] - ref) / ref})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
