"""Offloaded MoE inference on the trained model of bench/make_moe.py: caches, predictors, token scheduling.

Measured on held-out text (never seen by the model, the traces or the predictor):
  - per variant (LRU on demand, LFU, score-aware, LRU + cross-layer prefetch, predictive + cross-layer,
    predictive + routing-path predictor) and expert budget (12.5%, 25%, 50% of all expert bytes): decode
    hit ratio, late prefetches, misses, prefetch precision/recall, bytes read and stall per token, decode
    tokens/s;
  - baselines in the same run: the model fully in memory, and accelerate's disk offload at the same memory
    budget, with its offload files dropped from the page cache before each step ("cold", as our expert
    reads are) and left in the page cache ("warm", its best case, which a model larger than RAM never has);
  - top-k accuracy per layer of the cross-layer gate and of the routing-path predictor;
  - token scheduling: distinct experts per layer per decode step with and without regrouping.

Decoding is teacher-forced (memfit.moe.generate.replay): the held-out text is fed one token at a time
through the KV cache, exactly the computation of generation, with the routing of real text. (A briefly
trained model's own greedy output soon repeats itself, and repeats route alike, flattering every cache.)
Our expert reads always drop their pages from the page cache: every miss is a disk read.

    .venv/bin/python bench/make_moe.py              # once: the model (runs/moe-model)
    .venv/bin/python bench/moe.py                   # ~15 min on 2 CPU cores; table, results/moe.json, plot
    .venv/bin/python bench/moe.py --quick           # fewer windows and budgets, for a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import disk_read_bytes, drop_page_cache, md_table, print_readme_tables, report, unmapped  # noqa: E402

if TYPE_CHECKING:  # torch loads in the functions: importing this file (bench/readme_check.py) stays cheap
    import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (policy, predictor, drop_cache); "path" is the routing-path predictor trained below
    "LRU on demand": ("lru", None, True),
    "LFU": ("lfu", None, True),
    "score-aware": ("score", None, True),
    "LRU + cross-layer prefetch": ("lru", "cross-layer", True),
    "predictive + cross-layer": ("predictive", "cross-layer", True),
    "predictive + routing path": ("predictive", "path", True),
    # the same, reads left in the page cache: the fair match for accelerate "warm"
    "predictive + routing path (warm)": ("predictive", "path", False),
}


def prepare(model_dir: Path, work: Path, trace_tokens: int, heldout_tokens: int, seq: int):
    """Traces of the train and held-out text, and a routing-path predictor trained on the train trace."""
    import memfit.moe as moe
    from memfit.moe.trace import read_texts, record, token_windows

    tok = _tokenizer(model_dir)
    work.mkdir(parents=True, exist_ok=True)
    traces = {}
    for part, tokens in (("train", trace_tokens), ("heldout", heldout_tokens)):
        path = work / f"trace-{part}.safetensors"
        if not path.is_file():
            windows = token_windows(tok, read_texts(model_dir / "text" / f"{part}.jsonl"), seq)[: tokens // seq]
            model = moe.load(model_dir, "100%", "lru", None)
            t0 = time.perf_counter()
            record(model, windows).save(path)
            model.memfit_moe.close()
            print(f"traced {part}: {windows.numel()} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        traces[part] = moe.Trace.load(path)
    predictor_path = work / "predictor.safetensors"
    if not predictor_path.is_file():
        t0 = time.perf_counter()
        moe.RoutingPath.train(traces["train"]).save(predictor_path)
        print(f"trained the routing-path predictor in {time.perf_counter() - t0:.0f} s", flush=True)
    predictor = moe.RoutingPath.load(predictor_path)
    return tok, traces, predictor, predictor_path


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def heldout_windows(model_dir: Path, tok, n: int, length: int) -> torch.Tensor:
    from memfit.moe.trace import read_texts, token_windows

    windows = token_windows(tok, read_texts(model_dir / "text" / "heldout.jsonl"), length)
    step = max(1, windows.shape[0] // n)
    return windows[::step][:n]  # spread over the held-out text


class Runner:
    """One model under test. Runners of a budget take turns window by window (interleaved), so a burst of
    other work on a shared machine slows every variant alike; speed is the median over windows of decode
    tokens/s."""

    def __init__(self, model, runtime=None, cleanup=None) -> None:
        self.model, self.runtime, self.cleanup = model, runtime, cleanup
        self.speeds, self.tokens, self.disk_bytes = [], 0, 0
        self.totals: dict[str, float] = {}
        self.layers: dict[int, list[int]] = {}

    def run(self, window: torch.Tensor, prefill: int) -> None:
        from memfit.moe.generate import replay

        read0 = disk_read_bytes()
        on_prefilled = self.runtime.reset_stats if self.runtime is not None else None
        timing = replay(self.model, window.view(1, -1), prefill, on_prefilled)
        self.disk_bytes += disk_read_bytes() - read0
        self.speeds.append(timing.decode_tokens_per_s)
        self.tokens += timing.new_tokens - 1
        if self.runtime is not None:
            for k, v in self.runtime.stats.as_dict().items():
                self.totals[k] = self.totals.get(k, 0) + v
            for l, counts in self.runtime.layer_stats.items():
                self.layers[l] = [a + b for a, b in zip(self.layers.get(l, [0, 0, 0]), counts, strict=True)]

    def result(self) -> dict:
        out = {"decode_tok_s": statistics.median(self.speeds), "tokens": self.tokens,
               "disk_bytes_per_token": self.disk_bytes / self.tokens}
        if self.runtime is None:
            return out
        t, n = self.totals, self.totals["accesses"]
        used, wasted = t["prefetch_used"], t["prefetch_wasted"]
        return out | {
            "hit_ratio": t["hits"] / n, "late": t["late"] / n, "miss": t["misses"] / n,
            "precision": used / (used + wasted) if used + wasted else None,
            "recall": used / (used + t["misses"]) if used + t["misses"] else None,
            "bytes_per_token": t["bytes_read"] / self.tokens, "stall_ms_per_token": 1000 * t["stall_s"] / self.tokens,
            "read_gbps": t["bytes_read"] / t["read_s"] / 1e9 if t["read_s"] else None,
            "layer_hit_ratio": {l: h / max(1, h + late + m) for l, (h, late, m) in sorted(self.layers.items())},
        }

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        if self.cleanup is not None:
            self.cleanup()


def offloaded(model_dir: Path, policy: str, predictor, budget: str, drop_cache: bool) -> Runner:
    import memfit.moe as moe

    model = moe.load(model_dir, budget, policy, predictor, drop_cache=drop_cache)
    return Runner(model, model.memfit_moe)


def in_memory(model_dir: Path) -> Runner:
    import torch
    from transformers import AutoModelForCausalLM

    return Runner(unmapped(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()))


def _assertunmapped(model_dir: Path) -> None:
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(model_dir.resolve()) in line]
    if mapped:
        raise RuntimeError(f"the checkpoint is still mapped ({mapped[0]}); cold reads would hit the page cache.")


def accelerate_offload(model_dir: Path, budget_share: float, cold: bool) -> tuple[Runner, dict]:
    """accelerate's disk offload under the same memory: non-expert weights + `budget_share` of the experts.
    cold: its offload files are dropped from the page cache before every forward, as our reads are."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() * 4 for p in empty.parameters())
    experts = sum(p.numel() * 4 for n, p in empty.named_parameters() if ".experts." in n)
    budget = int(total - experts + budget_share * experts)
    no_split = list({type(m).__name__ for n, m in empty.named_modules() if n.endswith("mlp.experts")})
    device_map = infer_auto_device_map(empty, max_memory={"cpu": budget, "disk": 10**13},
                                       no_split_module_classes=no_split)
    folder = Path(tempfile.mkdtemp(prefix="memfit-accelerate-"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=folder,
                                                 dtype=torch.float32).eval()
    unmapped(model)
    if cold:
        model.register_forward_pre_hook(lambda m, a: drop_page_cache(list(folder.iterdir())))
    info = {"offloaded_bytes": sum(f.stat().st_size for f in folder.iterdir()), "cpu_budget_bytes": budget,
            "folder": folder}
    return Runner(model, cleanup=lambda: shutil.rmtree(folder, ignore_errors=True)), info


def run_schedule(model_dir: Path, predictor_path: Path, tok, n_docs: int, prompt_tokens: int, continuation: int,
                 batch: int) -> dict:
    """Batches of held-out documents: prompt = their first tokens, then their own continuation decoded
    (teacher-forced) as a batch; distinct experts per layer per decode step, in input order vs scheduled
    (regrouped by the route signatures of the prompts alone)."""
    import torch

    import memfit.moe as moe
    from memfit.moe.generate import ExpertCounter, replay
    from memfit.moe.schedule import in_order_batches, plan_batches, route_signatures
    from memfit.moe.trace import read_texts

    length = prompt_tokens + continuation
    rows = [ids[:length] for ids in (tok(t)["input_ids"] for t in read_texts(model_dir / "text" / "heldout.jsonl"))
            if len(ids) >= length]
    rows = torch.tensor(rows[:: max(1, len(rows) // n_docs)][:n_docs])  # spread over the held-out documents
    out = {}
    for name in ("input order", "scheduled", "scheduled, oracle signatures"):
        model = moe.load(model_dir, "25%", "predictive", predictor_path)
        if name == "scheduled":  # what a user gets: signatures of the prompts alone
            batches = plan_batches(route_signatures(model, list(rows[:, :prompt_tokens])), batch)
        elif name.endswith("oracle signatures"):  # the headroom: signatures of the whole documents
            batches = plan_batches(route_signatures(model, list(rows)), batch)
        else:
            batches = in_order_batches(rows.shape[0], batch)
        counter = ExpertCounter(model)
        per_batch, decode_s = [], 0.0
        for b in batches:
            counter.reset()
            model.memfit_moe.reset_stats()
            decode_s += replay(model, rows[b], prompt_tokens).decode_s
            per_batch.append(counter.decode_mean())
        counter.close()
        model.memfit_moe.close()
        out[name] = {"distinct_experts_per_layer_step": sum(per_batch) / len(per_batch),
                     "decode_tok_s": rows.shape[0] * (continuation - 1) / decode_s, "batches": len(batches)}
    return out


def plot(runs: list[dict], baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    speed_lines = ("LRU on demand", "predictive + cross-layer", "predictive + routing path",
                   "predictive + routing path (warm)")
    for i, name in enumerate(VARIANTS):
        pts = sorted((r["budget_pct"], r) for r in runs if r["variant"] == name)
        if not pts:
            continue
        xs, color = [p for p, _ in pts], f"C{i}"
        ax1.plot(xs, [100 * r["hit_ratio"] for _, r in pts], marker="o", color=color, label=name,
                 linestyle="--" if name.endswith("(warm)") else "-")
        if name in speed_lines:
            ax2.plot(xs, [r["decode_tok_s"] for _, r in pts], marker="o", color=color, label=name,
                     linestyle="--" if name.endswith("(warm)") else "-")
    for mode, style in (("cold", "-"), ("warm", "--")):
        acc = sorted((b["budget_pct"], b) for b in baselines.get(f"accelerate {mode}", []))
        if acc:
            ax2.plot([p for p, _ in acc], [b["decode_tok_s"] for _, b in acc], color="k", linestyle=style,
                     marker="s", label=f"accelerate disk offload ({mode})")
    if "in memory" in baselines:
        ax2.axhline(baselines["in memory"]["decode_tok_s"], color="gray", linestyle=":", label="fully in memory")
    ax1.set(xlabel="expert budget (% of all expert bytes)", ylabel="decode hit ratio (%)",
            title="Decode hit ratio vs budget (held-out text)")
    ax2.set(xlabel="expert budget (% of all expert bytes)", ylabel="decode tokens/s (median)",
            title="Decode speed (solid: reads from disk; dashed: page cache warm)")
    budgets = sorted({r["budget_pct"] for r in runs})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's two tables, from results/moe.json alone (bench/readme_check.py compares them with the README).

    "variants": every variant by budget, then accelerate's disk offload at that budget, then the model in memory;
    "layer-accuracy": top-k accuracy per MoE layer of the cross-layer gate and the routing-path predictor.
    """
    runs, baselines = payload["runs"], payload["baselines"]
    accel = {mode: {b["budget_pct"]: b for b in baselines.get(f"accelerate {mode}", [])} for mode in ("cold", "warm")}
    budgets = sorted({r["budget_pct"] for r in runs} | set(accel["cold"]) | set(accel["warm"]))
    rows = []
    for b in budgets:
        for r in (r for r in runs if r["budget_pct"] == b):
            mode = "warm" if r["variant"].endswith("(warm)") else "cold"
            if r["precision"] is None:  # nothing was prefetched
                prefetch = "-"
            else:
                recall = "-" if r["recall"] is None else f"{100 * r['recall']:.0f}%"
                prefetch = f"{100 * r['precision']:.0f}% / {recall}"
            ref = accel[mode].get(b)
            rows.append([r["variant"], f"{b:g}%", _pct(r["hit_ratio"]), _pct(r["late"]), _pct(r["miss"]), prefetch,
                         f"{r['disk_bytes_per_token'] / 1e6:.1f}", f"{r['decode_tok_s']:.1f}",
                         f"{r['decode_tok_s'] / ref['decode_tok_s']:.1f}x {mode}" if ref is not None else "-"])
        for mode in ("cold", "warm"):
            if (a := accel[mode].get(b)) is not None:
                rows.append([f"accelerate disk offload ({mode})", f"{b:g}%", "", "", "", "",
                             f"{a['disk_bytes_per_token'] / 1e6:.1f}", f"{a['decode_tok_s']:.1f}", ""])
    if (mem := baselines.get("in memory")) is not None:
        rows.append(["fully in memory", "100%", "", "", "", "", f"{mem['disk_bytes_per_token'] / 1e6:.1f}",
                     f"{mem['decode_tok_s']:.1f}", ""])
    header = ["variant", "budget", "hit", "late", "miss", "prefetch precision / recall", "disk MB/token",
              "decode tok/s", "vs accelerate"]
    tables = {"variants": md_table(header, "lrrrrrrrr", rows)}

    # JSON keys are strings; layers sort as numbers
    cross = {int(k): v for k, v in payload["accuracy"]["cross-layer"].items()}
    routing = {int(k): v for k, v in payload["accuracy"]["routing-path"].items()}
    layers = sorted(routing)
    acc_rows = [[name, *(_pct(acc[l]) if l in acc else "-" for l in layers)]
                for name, acc in (("cross-layer gate", cross), ("routing-path predictor", routing))]
    tables["layer-accuracy"] = md_table(["MoE layer", *map(str, layers)], "l" + "r" * len(layers), acc_rows)
    return tables


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "moe-model")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "moe-bench", help="traces and predictor")
    ap.add_argument("--budgets", default="12.5,25,50", help="expert budgets, percent of all expert bytes")
    ap.add_argument("--windows", type=int, default=6, help="held-out windows to decode")
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--decode", type=int, default=48, help="decode steps per window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for decode on 2 cores)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "moe_hit_ratio.png")
    ap.add_argument("--quick", action="store_true", help="2 windows, the first 2 budgets, 16 scheduling documents")
    args = ap.parse_args()
    os.environ.setdefault("COLUMNS", "150")  # rich tables: wide enough for every column when piped
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}; run bench/make_moe.py first.")
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        args.windows, budgets = 2, budgets[:2]

    tok, traces, predictor, predictor_path = prepare(args.model, args.work, 60_000, 20_000, 128)
    windows = heldout_windows(args.model, tok, args.windows, args.prefill + args.decode)

    import memfit.moe as moe
    from memfit.moe.evaluate import predictor_accuracy
    from memfit.tiers.st_reader import checkpoint_files

    probe = moe.load(args.model, "100%", "lru", None)
    cross = predictor_accuracy(probe, windows, moe.CrossLayerGate(probe.memfit_moe.layers, probe.memfit_moe.arch))
    memory = probe.memfit_moe.memory()
    probe.memfit_moe.close()
    accuracy = {"cross-layer": cross,
                "routing-path": dict(zip(predictor.layers[1:], predictor.accuracy_on(traces["heldout"]), strict=True))}

    runs, baselines = [], {"accelerate cold": [], "accelerate warm": []}
    memory_runner = in_memory(args.model)
    for b in budgets:
        gc.collect()
        runners = {name: offloaded(args.model, policy, predictor_path if pred == "path" else pred, f"{b}%", drop)
                   for name, (policy, pred, drop) in VARIANTS.items()}
        infos = {}
        for mode in ("cold", "warm"):
            runners[f"accelerate {mode}"], infos[mode] = accelerate_offload(args.model, b / 100, mode == "cold")
        runners["in memory"] = memory_runner
        # Every turn starts with the checkpoint and the offload files out of the page cache, so no runner
        # reads what another left there ("warm" runners keep their own reads cached within their turn).
        files = checkpoint_files(args.model) + [f for info in infos.values() for f in info["folder"].iterdir()]
        _assertunmapped(args.model)
        for i, w in enumerate(windows):
            for runner in runners.values():
                drop_page_cache(files)
                runner.run(w, args.prefill)
            print(f"budget {b:g}%: window {i + 1}/{len(windows)}", flush=True)
        for name, runner in runners.items():
            if name == "in memory":
                continue
            r = runner.result()
            runner.close()
            if name.startswith("accelerate"):
                info = {k: v for k, v in infos[name.split()[1]].items() if k != "folder"}
                baselines[name].append({"budget_pct": b} | r | info)
            else:
                runs.append({"variant": name, "budget_pct": b} | r)
            print(f"{name:34s} {b:5.1f}%  hit {r.get('hit_ratio', float('nan')):.3f}  "
                  f"{r['decode_tok_s']:.1f} tok/s", flush=True)
    baselines["in memory"] = memory_runner.result()
    schedule = run_schedule(args.model, predictor_path, tok, 16 if args.quick else 96, 8, 8, 8)

    accel = {mode: {b["budget_pct"]: b["decode_tok_s"] for b in baselines[f"accelerate {mode}"]}
             for mode in ("cold", "warm")}
    rows = []
    for r in runs:
        b, mode = r["budget_pct"], "warm" if r["variant"].endswith("(warm)") else "cold"
        rows.append([r["variant"], f"{b:g}%", f"{100 * r['hit_ratio']:.1f}%", f"{100 * r['late']:.1f}%",
                     "-" if r["precision"] is None else f"{100 * r['precision']:.0f}%",
                     "-" if r["recall"] is None else f"{100 * r['recall']:.0f}%",
                     f"{r['bytes_per_token'] / 1e6:.1f}", f"{r['decode_tok_s']:.1f}",
                     f"{r['decode_tok_s'] / accel[mode][b]:.1f}x ({mode})" if b in accel[mode] else "-"])
    for mode, values in accel.items():
        for b, v in values.items():
            rows.append([f"accelerate disk offload ({mode})", f"{b:g}%", "-", "-", "-", "-", "-", f"{v:.2f}", ""])
    rows.append(["fully in memory", "100%", "-", "-", "-", "-", "-", f"{baselines['in memory']['decode_tok_s']:.1f}",
                 ""])
    payload = {"model": str(args.model), "memory": memory, "threads": args.threads, "windows": args.windows,
               "prefill": args.prefill, "decode": args.decode, "accuracy": accuracy, "runs": runs,
               "baselines": baselines, "schedule": schedule}
    path = report("moe", "Offloaded MoE decoding on held-out text (teacher-forced)",
           ["variant", "budget", "hit", "late", "precision", "recall", "MB read/token", "decode tok/s",
            "vs accelerate"], rows, payload)
    acc_rows = [[str(l), f"{100 * cross.get(l, float('nan')):.1f}%", f"{100 * accuracy['routing-path'][l]:.1f}%"]
                for l in accuracy["routing-path"]]
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Top-k accuracy per layer on held-out text")
    for col in ("MoE layer", "cross-layer gate", "routing-path predictor"):
        table.add_column(col, justify="right")
    for row in acc_rows:
        table.add_row(*row)
    Console().print(table)
    sched = Table(title="Token scheduling: held-out documents in batches of 8 (25% budget, routing-path predictor)")
    for col in ("batches", "distinct experts / layer / decode step", "decode tokens/s"):
        sched.add_column(col, justify="right")
    for name, s in schedule.items():
        sched.add_row(name, f"{s['distinct_experts_per_layer_step']:.2f}", f"{s['decode_tok_s']:.1f}")
    Console().print(sched)
    plot(runs, baselines, args.plot)
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
