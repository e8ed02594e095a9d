"""The memory planner against measured peaks: `memfit plan --json` beside `memfit finetune` with the same flags.

Each configuration runs in fresh processes: the plan (no weight read), then three updates of the real fine-tune
with glibc's default allocator, then the same with --lean-allocator (glibc's mmap threshold fixed at 256 KB:
larger blocks are mapped and unmapped, never kept in the heap). Seconds per update are of the last two. The
measured peak is the run's own figure (peak RSS since training started, metrics.jsonl's "end" event); the data
are long texts, so every batch is as long as --max-length, as the plan assumes.

    .venv/bin/python bench/plan.py            # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "plan"

# name -> (model, flags): the flags of both `memfit plan` and `memfit finetune`.
CONFIGS = {
    "SmolLM2, LoRA q,v, 4x128": ("smollm2", ["--batch-size", "4", "--max-length", "128"]),
    "SmolLM2, LoRA all-linear, 8x128": ("smollm2", ["--targets", "all-linear", "--batch-size", "8",
                                                     "--max-length", "128"]),
    "SmolLM2, LoRA q,v, adamw8bit, 4x256": ("smollm2", ["--optim", "adamw8bit", "--batch-size", "4",
                                                         "--max-length", "256"]),
    "SmolLM2, LoRA q,v, mezo, 8x256": ("smollm2", ["--optim", "mezo", "--lr", "1e-4", "--batch-size", "8",
                                                    "--max-length", "256"]),
    "MiniLM-L6, classify, LoRA, 16x128": ("minilm", ["--batch-size", "16", "--max-length", "128"]),
}


def data(kind: str) -> Path:
    """Long rows (40 shipped synopses joined), so every batch fills --max-length: text, or text with a label."""
    from memfit.cli.demo import DATA

    rows = [json.loads(line) for line in (DATA / "debian-sections-train.jsonl").read_text().splitlines()]
    path = WORK / f"long-{kind}.jsonl"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(0, 2400, 40):
            row = {"text": " ".join(r["text"] for r in rows[i:i + 40])}
            if kind == "classify":
                row["label"] = rows[i]["label"]
            lines.append(json.dumps(row))
        path.write_text("".join(line + "\n" for line in lines))
    return path


def memfit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"memfit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def measured(model: Path, flags: list[str], rows: Path, out: Path) -> tuple[int, float]:
    """(peak bytes, seconds per update after the first) of three updates."""
    memfit("finetune", "--model", str(model), "--data", str(rows), "--out", str(out), "--overwrite", "--quiet",
           "--max-steps", "3", "--log-every", "1", *flags)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in events if e.get("event") == "end")
    # examples_per_s counts from the start of training: elapsed time after update n is n x batch / rate
    elapsed = {e["step"]: e["step"] / e["examples_per_s"] for e in events if e.get("event") == "train"}
    batch = int(flags[flags.index("--batch-size") + 1])
    return end["peak_mem_bytes"], batch * (elapsed[3] - elapsed[1]) / 2


HEADER = ["configuration", "activations (plan), MB", "predicted peak, MB", "measured, MB", "pred ÷ meas",
          "measured, --lean-allocator, MB", "pred ÷ meas", "s/update, lean ÷ default"]


def _rows(payload: dict) -> list[list[str]]:
    rows = []
    for name, r in payload["configs"].items():
        c = r["components"]
        rows.append([name, f"{c['activations'] / 1e6:,.0f}", f"{r['predicted'] / 1e6:,.0f}",
                     f"{r['measured'] / 1e6:,.0f}", f"{r['predicted'] / r['measured']:.2f}",
                     f"{r['measured_lean'] / 1e6:,.0f}", f"{r['predicted'] / r['measured_lean']:.2f}",
                     f"{r['s_per_update_lean'] / r['s_per_update']:.2f}"])
    return rows


def readme_tables(payload: dict) -> dict[str, str]:
    return {"plan": md_table(HEADER, "lrrrrrrr", _rows(payload))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    from memfit.cli.demo import minilm_dir

    models = {"smollm2": smollm2_dir(ROOT / "runs" / "quality-llm"), "minilm": minilm_dir()}
    results = {}
    for name, (which, flags) in CONFIGS.items():
        model = models[which]
        rows = data("classify" if which == "minilm" else "text")
        plan = json.loads(memfit("plan", "--model", str(model), "--data", str(rows), *flags, "--json").stdout)
        out = WORK / "run"
        peak, seconds = measured(model, flags, rows, out)
        lean, lean_seconds = measured(model, [*flags, "--lean-allocator"], rows, out)
        results[name] = {"flags": flags, "predicted": plan["peak_bytes"], "components": plan["components"],
                         "measured": peak, "measured_lean": lean, "s_per_update": seconds,
                         "s_per_update_lean": lean_seconds}
        print(f"{name}: predicted {plan['peak_bytes'] / 1e6:,.0f} MB, measured {peak / 1e6:,.0f} MB "
              f"({plan['peak_bytes'] / peak:.2f}), lean {lean / 1e6:,.0f} MB ({plan['peak_bytes'] / lean:.2f}); "
              f"{seconds:.2f} vs {lean_seconds:.2f} s/update", flush=True)
    payload = {"configs": results}
    path = report("plan", "memfit plan: predicted against measured peak", HEADER, _rows(payload), payload)
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
