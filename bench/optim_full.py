"""Full-parameter fine-tuning of SmolLM2-135M-Instruct with little optimizer state: AdamW, AdamW8bit, GaLore, APOLLO
and APOLLO-Mini against each other, and LoRA r=16 for reference.

Task: causal-LM on the shipped debian-sections synopses (train split; held-out loss on 300 validation synopses),
batch 4 x 64 tokens, 100 updates; the same updates, seed, batches and schedule for every row: only the optimizer
(and, for the LoRA row, the method) differs. Every row gets the same sweep: four learning rates around its method's
usual rate, each a full-length run, extended upwards (up to two more, each one grid step higher) while the best is
the highest rate tried, and the row reports the one with the lowest held-out loss. Each run is a fresh process, so
its peak RSS (weights, gradients, states, activations) is its own; the optimizer-state bytes are what the optimizer
holds after training. GaLore and APOLLO rebuild their projections every 25 updates (the papers' 200 would never
refresh in a run this short) at rank 128 (GaLore's default; APOLLO's 256 is for hidden sizes of 768 and more, here
it would exceed the k/v projections' 192); embeddings and the head keep plain Adam, as in the papers, except in the
"+ embeddings" row. The untrained model's held-out loss is measured too.

Runs are appended to results/optim_full.json as they finish and a rerun skips them, so the benchmark can be
stopped and continued (`--fresh` starts over).

    .venv/bin/python bench/optim_full.py            # ~80 min on 2 CPU cores (30 runs of ~2.5 min here)
    .venv/bin/python bench/optim_full.py --quick    # 10 updates, one learning rate per row: a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, heldout_loss, machine, md_table, print_readme_tables, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "optim-full"
GiB, MiB = 2**30, 2**20
STEPS, BATCH, LENGTH, VAL_ROWS, GAP = 100, 4, 64, 300, 25
EXTEND = 2  # rates added above a row's grid while its best run is the highest rate tried (the same rule for all)

# row -> (method, optimizer, extra TrainConfig fields, learning rates swept)
ROWS: dict[str, tuple[str, str, dict, list[float]]] = {
    "AdamW": ("full", "adamw", {}, [1e-5, 3e-5, 1e-4, 3e-4]),
    "AdamW8bit": ("full", "adamw8bit", {}, [1e-5, 3e-5, 1e-4, 3e-4]),
    "GaLore r=128": ("full", "galore", {"proj_gap": GAP}, [3e-5, 1e-4, 3e-4, 1e-3]),  # scale 0.25: ~4x AdamW's rate
    "APOLLO r=128": ("full", "apollo", {"proj_gap": GAP, "proj_rank": 128}, [1e-5, 3e-5, 1e-4, 3e-4]),
    "APOLLO-Mini": ("full", "apollo-mini", {"proj_gap": GAP}, [1e-5, 3e-5, 1e-4, 3e-4]),
    "LoRA r=16 (reference)": ("lora", "adamw", {}, [1e-4, 3e-4, 1e-3, 3e-3]),
}
# Variants run once, at the learning rate their base row chose: (base row, extra fields)
VARIANTS: dict[str, tuple[str, dict]] = {
    "GaLore r=128, 8-bit states": ("GaLore r=128", {"proj_states": "8bit"}),
    "APOLLO-Mini + embeddings": ("APOLLO-Mini", {"proj_embeddings": True}),
}


def _data() -> tuple[Path, Path, Path]:
    from memfit.cli.demo import DATA

    WORK.mkdir(parents=True, exist_ok=True)
    train, val = WORK / "train.jsonl", WORK / "val.jsonl"
    for src, dst, n in ((DATA / "debian-sections-train.jsonl", train, None),
                        (DATA / "debian-sections-val.jsonl", val, VAL_ROWS)):
        if not dst.is_file():
            rows = [json.loads(line) for line in src.read_text().splitlines()][:n]
            dst.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return smollm2_dir(ROOT / "runs" / "zo-bench"), train, val


def run(method: str, optim: str, extra: dict, lr: float, steps: int) -> dict:
    """One run in this process."""
    import torch

    import memfit
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune

    torch.set_num_threads(2)
    model_dir, train, val = _data()
    slug = "-".join([method, optim, *(f"{k}={v}" for k, v in sorted(extra.items())), f"lr={lr}", str(steps)])
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, eval_batch_size=16, lr=lr, optim=optim, max_length=LENGTH,
                      log_every=10**9, checkpoint_every=10**9, eval_every=10**9, seed=0, **extra)
    adapter = memfit.FullConfig() if method == "full" else memfit.LoraConfig(
        r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    s = finetune(model_dir, train, WORK / slug, adapter, cfg, eval_data=val, quiet=True, overwrite=True)
    return {"lr": lr, "steps": steps, "eval_loss": s["eval_loss"], "train_loss": s.get("train_loss"),
            "state_bytes": s["optimizer_state_bytes"], "peak_rss": s["peak_mem_bytes"],
            "s_per_step": s["train_time_s"] / steps, "trainable_params": s["trainable_params"]}


def zero_shot() -> float:
    """Held-out loss of the untrained model (mean over target tokens, as the runs' evaluation)."""
    import torch

    from memfit.local import load_tokenizer
    from memfit.train.finetune import load_base
    from memfit.train.tasks import CausalLM

    torch.set_num_threads(2)
    model_dir, _, val = _data()
    model = load_base(model_dir, CausalLM())[0].eval()
    return heldout_loss(model, load_tokenizer(model_dir), val, LENGTH, batch=16)


def _subprocess(method: str, optim: str, extra: dict, lr: float, steps: int) -> dict:
    spec = json.dumps({"method": method, "optim": optim, "extra": extra, "lr": lr, "steps": steps})
    proc = subprocess.run([sys.executable, __file__, "--run", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"lr": lr, "steps": steps, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r and r["eval_loss"] == r["eval_loss"]]
    return min(ok, key=lambda r: r["eval_loss"]) if ok else None


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/optim_full.json alone (bench/readme_check.py compares the two)."""
    rows = []
    chosen = {name: best(runs) for name, runs in payload["runs"].items()}
    ref = chosen.get("AdamW")
    for name, b in chosen.items():
        swept = ", ".join(f"{r['lr']:g}: {r['eval_loss']:.3f}" if "error" not in r else f"{r['lr']:g}: failed"
                          for r in payload["runs"][name])
        if b is None:
            rows.append([name, "", "", "", "", "", "failed", "", swept])
            continue
        state, rss = (f"{b[k] / ref[k]:.3f}" if ref else "" for k in ("state_bytes", "peak_rss"))
        rows.append([name, f"{b['state_bytes'] / MiB:,.1f}", state, f"{b['peak_rss'] / GiB:.2f}", rss,
                     f"{b['s_per_step']:.2f}", f"{b['eval_loss']:.4f}",
                     f"{(b['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%" if ref else "", swept])
    if "zero_shot_loss" in payload:
        rows.append(["untrained model", "", "", "", "", "", f"{payload['zero_shot_loss']:.4f}", "", ""])
    header = ["row", "optimizer state MiB", "÷ AdamW", "peak RSS GiB", "÷ AdamW", "s/step", "held-out loss",
              "vs AdamW", "lr swept: held-out loss"]
    return {"full": md_table(header, "lrrrrrrrl", rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 updates, the middle learning rate only")
    ap.add_argument("--fresh", action="store_true", help="start over instead of skipping finished runs")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run == "zero-shot":
        print(json.dumps(zero_shot()))
        return
    if args.run:
        spec = json.loads(args.run)
        print(json.dumps(run(spec["method"], spec["optim"], spec["extra"], spec["lr"], spec["steps"])))
        return
    steps = 10 if args.quick else STEPS
    path = RESULTS / ("optim_full-quick.json" if args.quick else "optim_full.json")
    payload = json.loads(path.read_text()) if path.is_file() and not args.fresh else {"runs": {}}
    payload.update(machine=machine(), steps=steps, batch=BATCH, length=LENGTH, val_rows=VAL_ROWS, proj_gap=GAP)
    start = time.perf_counter()
    if "zero_shot_loss" not in payload:
        proc = subprocess.run([sys.executable, __file__, "--run", "zero-shot"], capture_output=True, text=True,
                              check=True)
        payload["zero_shot_loss"] = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = [(name, method, optim, extra, lrs[1:2] if args.quick else lrs)
            for name, (method, optim, extra, lrs) in ROWS.items()]
    for name, (base, more) in VARIANTS.items():
        method, optim, extra, _ = ROWS[base]
        plan.append((name, method, optim, {**extra, **more}, None))
    for name, method, optim, extra, lrs in plan:
        runs = payload["runs"].setdefault(name, [])
        variant = lrs is None
        if variant:  # a variant: its base row's chosen rate
            chosen = best(payload["runs"].get(VARIANTS[name][0], []))
            lrs = [chosen["lr"]] if chosen else []
        todo = list(lrs)
        while todo:
            lr = todo.pop(0)
            if not any(r["lr"] == lr and "error" not in r for r in runs):
                runs[:] = [r for r in runs if r["lr"] != lr]
                runs.append(_subprocess(method, optim, extra, lr, steps))
                RESULTS.mkdir(exist_ok=True)
                path.write_text(json.dumps(payload, indent=2) + "\n")
                print(f"{name} lr {lr:g}: {json.dumps(runs[-1])} ({(time.perf_counter() - start) / 60:.1f} min)",
                      flush=True)
            top = best(runs)
            if not todo and not variant and not args.quick and top is not None and top["lr"] == max(lrs) \
                    and len(lrs) < len(ROWS[name][3]) + EXTEND:  # the best at the top edge: one rate higher
                lrs = [*lrs, max(lrs) * lrs[-1] / lrs[-2]]
                todo.append(lrs[-1])
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
