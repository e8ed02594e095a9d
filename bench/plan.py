"""The memory planner against measured peaks, over fine-tunes, generation and serving, beside accelerate's and
DeepSpeed's estimators; and `--memory B` over a sweep of budgets.

Every configuration runs in fresh processes: `memfit plan --json` (no weight read), then the run itself.
- Fine-tunes: two updates of `memfit finetune --lean-allocator` (the planner's condition on the CPU: glibc's
  mmap threshold fixed, so freed activations leave the resident set); the measured peak is the run's own (peak
  RSS since training started, metrics.jsonl's "end" event). The data are long texts, so every batch is as long as
  --max-length, as the plan assumes. The first four are also run with glibc's default allocator.
- Generation: `memfit generate --lean-allocator --prompts FILE` (prompts of equal token count, greedy); its
  measured peak is the one it prints (peak RSS since generation started).
- Serving: `memfit serve --lean-allocator` at its limits: one request of --kv-budget tokens, then --max-seqs
  requests at once filling it; the peak is the server process's VmHWM from the first request on (reset through
  clear_refs).
- accelerate (`estimate-memory`'s own functions: the model's size, x4 for "training using Adam") and DeepSpeed
  (`estimate_zero2_model_states_mem_needs`, no offload, CPU + GPU parts) on the same models, where installed;
  DeepSpeed from --deepspeed-path (pip install --target DIR --no-deps deepspeed hjson py-cpuinfo msgpack ninja
  einops nvidia-ml-py), since it is not one of memfit's dependencies.
- The sweep: `memfit finetune --memory B` for budgets spread between the smallest plan and the request's own;
  each run's measured peak must stay at or under B.

    .venv/bin/python bench/plan.py [--deepspeed-path /tmp/ds]     # ~35 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "plan"
IMG = ROOT / "docs" / "img"

QV = ["--batch-size", "4", "--max-length", "128"]
ALL = ["--targets", "all-linear"]
# name -> (model, flags): the flags of both `memfit plan` and `memfit finetune`.
FINETUNE = {
    "SmolLM2, LoRA q,v, 4x128": ("smollm2", QV),
    "SmolLM2, LoRA all-linear, 8x128": ("smollm2", [*ALL, "--batch-size", "8", "--max-length", "128"]),
    "SmolLM2, LoRA q,v, adamw8bit, 4x256": ("smollm2", ["--optim", "adamw8bit", "--batch-size", "4",
                                                         "--max-length", "256"]),
    "MiniLM-L6, classify, LoRA, 16x128": ("minilm", ["--batch-size", "16", "--max-length", "128"]),
    "SmolLM2, LoRA q,v, mezo, 8x256": ("smollm2", ["--optim", "mezo", "--lr", "1e-4", "--batch-size", "8",
                                                    "--max-length", "256"]),
    "SmolLM2, LoRA all-linear, NF4 base, 4x128": ("smollm2", [*ALL, "--quantize", "nf4", *QV]),
    "SmolLM2, LoRA q,v, int8 base, 4x256": ("smollm2", ["--quantize", "int8", "--batch-size", "4",
                                                         "--max-length", "256"]),
    "SmolLM2, MoS all-linear, 4x128": ("smollm2", [*ALL, "--method", "mos", "--set", "r=8", "--set", "r_eq=1",
                                                    "--set", "r_pri=0", *QV]),
    "SmolLM2, LoRA all-linear, 2x512": ("smollm2", [*ALL, "--batch-size", "2", "--max-length", "512"]),
    "SmolLM2, LoRA q,v, 2x128 x accum 2": ("smollm2", ["--batch-size", "2", "--grad-accum", "2",
                                                        "--max-length", "128"]),
    "SmolLM2, full, apollo-mini, 2x128": ("smollm2", ["--method", "full", "--optim", "apollo-mini",
                                                       "--batch-size", "2", "--max-length", "128"]),
    "SmolLM2, DiffFit, 4x128": ("smollm2", ["--method", "difffit", *QV]),
    "MiniLM-L6, classify, LoRA all-linear, 32x128": ("minilm", [*ALL, "--batch-size", "32", "--max-length", "128"]),
    "MiniLM-L6, classify, MoS, 16x64": ("minilm", ["--method", "mos", "--set", "r=4", "--set", "r_eq=2",
                                                   "--set", "r_pri=1",
                                                   "--batch-size", "16", "--max-length", "64"]),
    "MiniLM-L6, classify, full, adamw, 16x128": ("minilm", ["--method", "full", "--batch-size", "16",
                                                            "--max-length", "128"]),
    "MiniLM-L6, classify, LoRA, NF4 base, 32x128": ("minilm", ["--quantize", "nf4", "--batch-size", "32",
                                                               "--max-length", "128"]),
    "SmolLM2, LoRA q,v, adamw8bit, 1x768": ("smollm2", ["--optim", "adamw8bit", "--batch-size", "1",
                                                         "--max-length", "768"]),
    "MoE (Mixtral, 8 experts), LoRA q,v, 4x128": ("moe", QV),
    "MoE (Mixtral, 8 experts), LoRA attention, adamw8bit, 8x128": (
        "moe", ["--targets", "q_proj,k_proj,v_proj,o_proj", "--optim", "adamw8bit", "--batch-size", "8",
                "--max-length", "128"]),
    "SmolLM2, LoRA q,v, --weights-budget 300MB, 4x128": ("smollm2", ["--weights-budget", "300MB", *QV]),
    "MoE (Mixtral, 8 experts), LoRA q,v, --expert-budget 50%, 4x128": ("moe", ["--expert-budget", "50%", *QV]),
}
DEFAULT_ALLOCATOR = list(FINETUNE)[:4]
# name -> (model, prompts, prompt tokens, new tokens, flags of both `memfit plan --for generate` and generate)
GENERATE = {
    "SmolLM2, generate 1 x (64 + 48)": ("smollm2", 1, 64, 48, ["--lean-allocator"]),
    "SmolLM2, generate 8 x (200 + 32), NF4": ("smollm2", 8, 200, 32, ["--quantize", "nf4", "--lean-allocator"]),
    "SmolLM2 + LoRA, generate 4 x (120 + 32)": ("smollm2", 4, 120, 32, ["ADAPTER", "--lean-allocator"]),
    "SmolLM2, generate 2 x (120 + 8), --weights-budget 300MB": ("smollm2", 2, 120, 8, ["--weights-budget", "300MB",
                                                                                       "--lean-allocator"]),
    "MoE (Mixtral), generate 4 x (120 + 32), --expert-budget 25%": ("moe", 4, 120, 32, ["--expert-budget", "25%",
                                                                                      "--lean-allocator"]),
}
# name -> (model, kv budget, max seqs, flags)
SERVE = {
    "SmolLM2, serve, LoRA, --kv-budget 2048 x 8 rows": ("smollm2", 2048, 8, ["ADAPTER", "--lean-allocator"]),
    "SmolLM2, serve, NF4, --kv-budget 4096 x 16 rows": ("smollm2", 4096, 16, ["--quantize", "nf4",
                                                                              "--lean-allocator"]),
}
SWEEP = ("SmolLM2, LoRA all-linear, 8x128", [0.0, 0.3, 0.6, 1.0])  # budgets between the smallest plan and full


def data(kind: str) -> Path:
    """Long rows, so every batch fills --max-length: text (100 shipped synopses joined: 24 rows of ~900 SmolLM2
    tokens), or text with a label (40 joined: 60 rows of ~400 tokens, enough rows for a batch of 32)."""
    from memfit.cli.demo import DATA

    rows = [json.loads(line) for line in (DATA / "debian-sections-train.jsonl").read_text().splitlines()]
    joined = 40 if kind == "classify" else 100
    path = WORK / f"long-{kind}-{joined}.jsonl"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(0, 2400, joined):
            row = {"text": " ".join(r["text"] for r in rows[i:i + joined])}
            if kind == "classify":
                row["label"] = rows[i]["label"]
            lines.append(json.dumps(row))
        path.write_text("".join(line + "\n" for line in lines))
    return path


def moe_dir(smollm2: Path) -> Path:
    """A Mixtral-architecture MoE of random weights (memory does not depend on their values) with SmolLM2's
    tokenizer: 8 layers, 8 experts top-2, 72M parameters; saved once with per-expert keys."""
    out = WORK / "moe"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=True)
    MixtralForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


class Failed(Exception):
    pass


def memfit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise Failed(f"memfit {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def plan(*args: str) -> dict:
    return json.loads(memfit("plan", *args, "--json").stdout)


def finetune_peak(model: Path, flags: list[str], rows: Path, out: Path) -> int:
    memfit("finetune", "--model", model, "--data", rows, "--out", out, "--overwrite", "--quiet", "--max-steps", "2",
           *flags)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e.get("event") == "end")["peak_mem_bytes"]


def _table_bytes(text: str, row: str) -> tuple[int, int]:
    """(planned, measured) bytes of `row` in a printed "planned and measured" table."""
    from memfit.tiers.budget import parse_size

    line = next(line for line in text.splitlines() if line.strip("│┃ ").startswith(row))
    cells = [c.strip() for c in line.strip("│┃").split("│")]
    return parse_size(cells[1].replace(" ", "")), parse_size(cells[2].replace(" ", ""))


def prompts_file(tokenizer, count: int, tokens: int, path: Path) -> int:
    """`count` prompts of real text cut to `tokens` tokens each (re-encoded to check); the longest's length."""
    text = data("text").read_text().splitlines()
    lengths, lines = [], []
    for i in range(count):
        ids = tokenizer(json.loads(text[i])["text"])["input_ids"][:tokens]
        prompt = tokenizer.decode(ids)
        lengths.append(len(tokenizer(prompt)["input_ids"]))
        lines.append(json.dumps({"prompt": prompt}))
    path.write_text("".join(line + "\n" for line in lines))
    return max(lengths)


def generate_peak(model: Path, prompts: Path, new: int, flags: list[str]) -> tuple[int, int]:
    """(planned, measured) peak bytes as `memfit generate` prints them."""
    proc = memfit("generate", "--model", model, "--prompts", prompts, "-n", str(new), "--out", WORK / "gen.jsonl",
                  *flags)
    return _table_bytes(proc.stderr, "peak")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        r.read()


def serve_peak(model: Path, tokenizer, kv_budget: int, max_seqs: int, flags: list[str]) -> int:
    """The server's peak RSS (VmHWM) from its first request on, under a load at its limits."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memfit.cli", "serve", "--model", str(model), "--port", str(port),
                             "--kv-budget", str(kv_budget), "--max-seqs", str(max_seqs), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise Failed(f"memfit serve failed:\n{proc.stderr.read()[-3000:]}") from None
                time.sleep(0.5)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        name = "a" if any(f.startswith("a=") for f in flags) else model.name  # the adapter, or the base
        texts = data("text").read_text().splitlines()

        def prompt(i: int, tokens: int) -> str:
            words = " ".join(json.loads(texts[j % len(texts)])["text"] for j in range(i, i + 8))
            return tokenizer.decode(tokenizer(words)["input_ids"][:tokens - 4])  # room for re-encoding's drift

        _post(port, {"model": name, "prompt": prompt(0, kv_budget - 2), "max_tokens": 2, "temperature": 0})
        threads = [threading.Thread(target=_post, args=(port, {"model": name, "prompt": prompt(i, kv_budget // max_seqs
                                                                                                - 2),
                                                                "max_tokens": 2, "temperature": 0}))
                   for i in range(max_seqs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def estimators(model: Path, quantize: str | None, ds_path: str | None) -> dict:
    """accelerate's inference (model size) and training (x4) estimates, DeepSpeed's ZeRO-2 model states."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage
    from transformers import AutoConfig, AutoModel

    with init_empty_weights():
        empty = AutoModel.from_config(AutoConfig.from_pretrained(model), dtype=torch.float32)
    total, _ = calculate_maximum_sizes(empty)
    params = sum(p.numel() for p in empty.parameters())
    out = {"accelerate_inference": total / {"nf4": 8, "int8": 4}.get(quantize, 1),
           "accelerate_training": max(estimate_training_usage(total, "float32").values())}
    if ds_path:
        code = ("import sys, json; from deepspeed.runtime.zero.stage_1_and_2 import "
                "estimate_zero2_model_states_mem_needs as f; "
                f"cpu, gpu = f({params}, num_gpus_per_node=1, num_nodes=1, cpu_offload=False); "
                "print(json.dumps(cpu + gpu))")
        env = {**os.environ, "PYTHONPATH": ds_path}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            out["deepspeed"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


HEADER = ["configuration", "predicted peak, MB", "measured, MB", "pred ÷ meas", "default allocator: pred ÷ meas",
          "accelerate ÷ meas", "DeepSpeed ÷ meas"]
SWEEP_HEADER = ["budget, MB", "chosen settings", "predicted, MB", "measured, MB", "measured ≤ budget"]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else ""


def _rows(payload: dict) -> list[list[str]]:
    rows = []
    for name, r in payload["configs"].items():
        estimate = r["estimators"]
        accelerate = estimate["accelerate_training" if r["kind"] == "finetune" else "accelerate_inference"]
        rows.append([name, f"{r['predicted'] / 1e6:,.0f}", f"{r['measured'] / 1e6:,.0f}",
                     f"{r['predicted'] / r['measured']:.2f}", _ratio(r["predicted"], r.get("measured_default")),
                     _ratio(accelerate, r["measured"]),
                     _ratio(estimate.get("deepspeed"), r["measured"]) if r["kind"] == "finetune" else ""])
    return rows


def _sweep_rows(payload: dict) -> list[list[str]]:
    return [[f"{s['budget'] / 1e6:,.0f}", " ".join(s["changes"]) or "as requested", f"{s['predicted'] / 1e6:,.0f}",
             f"{s['measured'] / 1e6:,.0f}", "yes" if s["measured"] <= s["budget"] else "**no**"]
            for s in payload["sweep"]]


def readme_tables(payload: dict) -> dict[str, str]:
    ratios = [r["predicted"] / r["measured"] for r in payload["configs"].values()]
    worst = max(ratios, key=lambda x: abs(x - 1))
    summary = (f"{len(ratios)} configurations: predicted ÷ measured {min(ratios):.2f}-{max(ratios):.2f}, worst "
               f"{worst:.2f}; {sum(0.9 <= x <= 1.1 for x in ratios)} of {len(ratios)} within 0.9-1.1.")
    return {"plan": md_table(HEADER, "lrrrrrr", _rows(payload)) + "\n\n" + summary,
            "sweep": md_table(SWEEP_HEADER, "rlrrl", _sweep_rows(payload))}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    kinds = {"finetune": ("o", "tab:blue"), "generate": ("s", "tab:green"), "serve": ("^", "tab:purple")}
    configs = payload["configs"].values()
    for kind, (marker, color) in kinds.items():
        pts = [(r["measured"] / 1e9, r["predicted"] / 1e9) for r in configs if r["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=f"memfit plan: {kind}", zorder=3)
    acc = [(r["measured"] / 1e9, r["estimators"]["accelerate_training" if r["kind"] == "finetune"
                                                else "accelerate_inference"] / 1e9) for r in configs]
    ax.scatter(*zip(*acc, strict=True), marker="x", color="tab:orange", label="accelerate estimate-memory")
    ds = [(r["measured"] / 1e9, r["estimators"]["deepspeed"] / 1e9) for r in configs if "deepspeed" in r["estimators"]]
    if ds:
        ax.scatter(*zip(*ds, strict=True), marker="+", color="tab:red", label="DeepSpeed ZeRO-2 estimator")
    lo, hi = 0.05, 5
    ax.plot([lo, hi], [lo, hi], color="black", lw=1)
    ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="gray", alpha=0.2, label="±10%")
    ax.set(xscale="log", yscale="log", xlim=(0.5, 3), ylim=(lo, hi), xlabel="measured peak, GB",
           ylabel="predicted (estimated) peak, GB", title="Predicted against measured peak memory (CPU)")
    ticks = [0.05, 0.1, 0.2, 0.5, 1, 2, 3, 5]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks([t for t in ticks if 0.5 <= t <= 3])
    ax.set_yticks(ticks)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed-path", help="a folder DeepSpeed was installed into (pip install --target)")
    ap.add_argument("--report", action="store_true", help="the tables and plot from results/plan.json")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these configurations (repeatable) and merge them into results/plan.json")
    args = ap.parse_args()
    if args.report:
        path = ROOT / "results" / "plan.json"
        plot(json.loads(path.read_text()), IMG / "plan.png")
        print_readme_tables(readme_tables, path)
        return
    from transformers import AutoTokenizer

    from memfit.cli.demo import minilm_dir
    from memfit.tiers.budget import parse_size

    smollm2 = smollm2_dir(ROOT / "runs" / "quality-llm")
    models = {"smollm2": smollm2, "minilm": minilm_dir(), "moe": moe_dir(smollm2)}
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    adapter = WORK / "adapter"
    results: dict[str, dict] = {}
    t0 = time.time()

    failures: dict[str, str] = {}

    def done(name: str, r: dict) -> None:
        results[name] = r
        extra = f", default allocator {r['predicted'] / r['measured_default']:.2f}" if "measured_default" in r else ""
        print(f"{name}: predicted {r['predicted'] / 1e6:,.0f} MB, measured {r['measured'] / 1e6:,.0f} MB "
              f"({r['predicted'] / r['measured']:.2f}){extra}  [{(time.time() - t0) / 60:.1f} min]", flush=True)

    def finetune_config(name: str, which: str, flags: list[str]) -> None:
        model, rows = models[which], data("classify" if which == "minilm" else "text")
        lean = [*flags, "--lean-allocator"]
        planned = plan("--model", model, "--data", rows, *lean)
        out = adapter if name == list(FINETUNE)[0] else WORK / "run"
        r = {"kind": "finetune", "flags": flags, "predicted": planned["peak_bytes"],
             "components": planned["components"], "measured": finetune_peak(model, lean, rows, out),
             "estimators": estimators(model, _quantize(flags), args.deepspeed_path)}
        if name in DEFAULT_ALLOCATOR:
            r["measured_default"] = finetune_peak(model, flags, rows, WORK / "run")
        done(name, r)

    def generate_config(name: str, which: str, count: int, tokens: int, new: int, flags: list[str]) -> None:
        flags = [f for f in flags if f != "ADAPTER"] + (["--adapter", str(adapter)] if "ADAPTER" in flags else [])
        prompts = WORK / "prompts.jsonl"
        longest = prompts_file(tokenizer, count, tokens, prompts)
        planned = plan("--for", "generate", "--model", models[which], "--prompt-tokens", longest,
                       "--max-new-tokens", new, "--prompts", count, *flags)
        printed, measured = generate_peak(models[which], prompts, new, flags)
        done(name, {"kind": "generate", "flags": flags, "predicted": planned["peak_bytes"],
                    "components": planned["components"], "measured": measured, "printed_plan": printed,
                    "estimators": estimators(models[which], _quantize(flags), None)})

    def serve_config(name: str, which: str, kv: int, seqs: int, flags: list[str]) -> None:
        plan_flags = [f for f in flags if f != "ADAPTER"] + (["--adapter", str(adapter)] if "ADAPTER" in flags else [])
        serve_flags = [f for f in flags if f != "ADAPTER"] + (["--adapter", f"a={adapter}"] if "ADAPTER" in flags
                                                              else [])
        planned = plan("--for", "serve", "--model", models[which], "--kv-budget", kv, "--max-seqs", seqs, *plan_flags)
        measured = serve_peak(models[which], tokenizer, kv, seqs, serve_flags)
        done(name, {"kind": "serve", "flags": flags, "predicted": planned["peak_bytes"],
                    "components": planned["components"], "measured": measured,
                    "estimators": estimators(models[which], _quantize(flags), None)})

    for runner, table in ((finetune_config, FINETUNE), (generate_config, GENERATE), (serve_config, SERVE)):
        for name, spec in table.items():
            if args.only and name not in args.only:
                continue
            try:
                runner(name, *spec)
            except Failed as e:
                failures[name] = str(e)
                print(f"{name}: FAILED\n{e}", flush=True)

    if args.only:  # merged into the results of the last whole run
        path = ROOT / "results" / "plan.json"
        payload = json.loads(path.read_text())
        payload["configs"].update(results)
        payload["failures"] = {k: v for k, v in {**payload.get("failures", {}), **failures}.items()
                               if k not in results}
        payload["rerun"] = sorted(set(payload.get("rerun", [])) | set(results))
        path = report("plan", "memfit plan: predicted against measured peak", HEADER, _rows(payload), payload)
        plot(payload, IMG / "plan.png")
        print_readme_tables(readme_tables, path)
        return
    name, fractions = SWEEP
    flags, rows = FINETUNE[name][1], data("text")
    full = results[name]["predicted"]
    smallest = plan("--model", smollm2, "--data", rows, *flags, "--batch-size", "1", "--grad-accum", "8",
                    "--optim", "adamw8bit", "--quantize", "nf4", "--lean-allocator")["peak_bytes"]
    sweep = []
    for f in fractions:
        budget = parse_size(f"{(smallest + f * (full - smallest)) / 0.9 * 1.01 / 1e6:.0f}MB")
        try:
            chosen = plan("--model", smollm2, "--data", rows, *flags, "--memory", f"{budget}")
            measured = finetune_peak(smollm2, [*flags, "--memory", str(budget)], rows, WORK / "run")
        except Failed as e:
            failures[f"--memory {budget}"] = str(e)
            continue
        sweep.append({"budget": budget, "changes": _changes(chosen.get("command", ""), flags),
                      "predicted": chosen["peak_bytes"], "measured": measured})
        print(f"--memory {budget / 1e6:,.0f} MB: {' '.join(sweep[-1]['changes'])}: predicted "
              f"{chosen['peak_bytes'] / 1e6:,.0f} MB, measured {measured / 1e6:,.0f} MB", flush=True)
    shutil.rmtree(WORK / "run", ignore_errors=True)
    payload = {"configs": results, "sweep": sweep, "failures": failures, "minutes": (time.time() - t0) / 60}
    path = report("plan", "memfit plan: predicted against measured peak", HEADER, _rows(payload), payload)
    plot(payload, IMG / "plan.png")
    print_readme_tables(readme_tables, path)


def _quantize(flags: list[str]) -> str | None:
    return flags[flags.index("--quantize") + 1] if "--quantize" in flags else None


def _changes(command: str, requested: list[str]) -> list[str]:
    """The flags of the command `--memory` printed that the request did not have (memory-relevant ones)."""
    tail = command.split("--method", 1)[1].split()[1:] if "--method" in command else []
    out, i = [], 0
    while i < len(tail):
        flag = tail[i]
        value = tail[i + 1] if i + 1 < len(tail) and not tail[i + 1].startswith("--") else None
        if flag in ("--batch-size", "--grad-accum", "--optim", "--quantize") and (
                flag not in requested or requested[requested.index(flag) + 1] != value):
            out.append(f"{flag} {value}")
        i += 2 if value is not None else 1
    return out


if __name__ == "__main__":
    main()
