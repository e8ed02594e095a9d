"""LoRA fine-tuning of the bench/make_moe.py MoE model with its experts on disk, against the model in memory.

Variants, each in a fresh process per round (rounds interleave them, so machine noise hits all alike):
    memory        the whole model in memory (transformers' experts, plain autograd): the baseline
    offload N%    experts offloaded under a budget of N% of all expert bytes (memfit.moe.load, the model
                  `memfit finetune --expert-budget N%` trains); reads drop their pages, so every miss is a disk read
    accelerate    accelerate's disk offload (device_map + offload_folder) under the memory of `offload 25%`,
                  its offload files dropped from the page cache before each forward, as our reads are, with
                  PEFT's LoRA (the standard pairing); a baseline that cannot train is reported with its error

Every other variant trains memfit's LoRA (r=16 on q/k/v/o) with AdamW on the same batches of the model's training
text, after one warm-up step. Per variant: s/step, disk MB/step (the kernel's read_bytes), expert hit ratio in
the forward and in the backward, read stall per step, and peak anonymous RSS of the whole run (load included)
over the process's baseline. The floor beside each offloaded run is the in-memory step plus its bytes read per
step at the cold sequential read bandwidth of the checkpoint, measured in the same run.

    .venv/bin/python bench/make_moe.py              # once: the model (runs/moe-model)
    .venv/bin/python bench/moe_train.py             # ~8 min on 2 CPU cores; table and results/moe_train.json
    .venv/bin/python bench/moe_train.py --quick     # one round, fewer steps, for a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    AnonPeak,
    disk_floor_gbps,
    disk_read_bytes,
    drop_page_cache,
    md_table,
    print_readme_tables,
    process_result,
    report,
    unmapped,
)

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (12.5, 25.0, 50.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batches(model_dir: Path, n: int, batch: int, seq: int):
    from _corpus import batches, token_stream
    from transformers import AutoTokenizer

    from memfit.moe.trace import read_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = token_stream(tok, read_texts(model_dir / "text" / "train.jsonl"))
    return list(batches(ids, seq, batch, n, seed=0))


def _accelerate(model_dir: Path, cpu_budget: int, folder: Path):
    """The model under accelerate's disk offload: what does not fit `cpu_budget` bytes goes to `folder`."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    no_split = list({type(m).__name__ for n, m in empty.named_modules() if n.endswith("mlp.experts")})
    device_map = infer_auto_device_map(empty, max_memory={"cpu": cpu_budget, "disk": 10**13},
                                       no_split_module_classes=no_split)
    model = unmapped(AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=folder,
                                                          dtype=torch.float32))
    model.register_forward_pre_hook(lambda m, a: drop_page_cache(list(folder.iterdir())))
    return model, sum(f.stat().st_size for f in folder.iterdir())


def run_variant(variant: str, model_dir: Path, args: argparse.Namespace, cpu_budget: int, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import memfit
    import memfit.moe as moe

    torch.set_num_threads(args.threads)
    data = _batches(model_dir, args.steps + 1, args.batch, args.seq)
    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()  # allocator, thread pool and autograd engine started before the baseline
    folder, extra, rt = None, {}, None
    with AnonPeak() as peak:
        if variant == "memory":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        elif variant == "accelerate":
            folder = Path(tempfile.mkdtemp(prefix="memfit-accelerate-"))
            model, extra["offloaded_bytes"] = _accelerate(model_dir, cpu_budget, folder)
        else:
            model = moe.load(model_dir, f"{float(variant.split()[1].rstrip('%'))}%")
            rt = model.memfit_moe
        torch.manual_seed(1)
        if variant == "accelerate":  # the standard tool's LoRA over accelerate's offload hooks
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        else:
            memfit.inject(model, memfit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(ids) -> float:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        try:
            losses = [step(data[0])]  # warm-up: optimizer state, grads, the first reads
            if rt is not None:
                rt.reset_stats()
            disk0, times = disk_read_bytes(), []
            for ids in data[1:]:
                t0 = time.perf_counter()
                losses.append(step(ids))
                times.append(time.perf_counter() - t0)
        except Exception as e:  # a baseline that cannot train is reported, not hidden
            queue.put({"variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
            return
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    result = {"variant": variant, "step_s": statistics.median(times), "steps": len(times),
              "disk_bytes_per_step": (disk_read_bytes() - disk0) / len(times), "peak_anon_bytes": peak.growth,
              "losses": losses} | extra
    if rt is not None:
        phases = rt.phase_summary()
        result |= {"memory": rt.memory(), "read_bytes_per_step": rt.stats.bytes_read / len(times),
                   "stall_s_per_step": rt.stats.stall_s / len(times),
                   "forward_hit_ratio": phases["forward"]["hit_ratio"],
                   "backward_hit_ratio": phases["backward"]["hit_ratio"], "phases": phases}
        rt.close()
    queue.put(result)


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/moe_train.json alone (bench/readme_check.py compares the two)."""
    results, floor = payload["results"], payload["disk_floor_gbps"]
    base = results["memory"]
    rows = []
    for name, r in results.items():
        if "error" in r:  # its error is quoted in the README's text
            rows.append(["accelerate disk offload + PEFT LoRA, 25% memory", "does not train", "", "", "", "", "", ""])
            continue
        offload = "forward_hit_ratio" in r
        label = f"experts on disk, {name.split()[1]} budget" if offload else (
            "fully in memory" if name == "memory" else "accelerate disk offload, 25% memory")
        floor_cell = hits = ""
        if offload:
            floor_s = base["step_s"] + r["read_bytes_per_step"] / 1e9 / floor
            floor_cell = f"{floor_s:.2f} ({r['step_s'] / floor_s:.2f}x)"
            hits = f"{100 * r['forward_hit_ratio']:.1f}% / {100 * r['backward_hit_ratio']:.1f}%"
        rows.append([label, f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}", floor_cell,
                     f"{r['disk_bytes_per_step'] / 1e6:.0f}", hits, f"{r['peak_anon_bytes'] / 1e6:.0f}",
                     f"{r['peak_anon_bytes'] / base['peak_anon_bytes']:.2f}"])
    header = ["variant", "s/step", "÷ memory", "floor s/step (÷ floor)", "disk MB/step", "hit fwd / bwd",
              "peak RSS MB", "÷ memory"]
    return {"step": md_table(header, "lrrrrrrr", rows)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "moe-model")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per variant; the fastest is kept")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-accelerate", action="store_true", help="skip the accelerate disk-offload baseline")
    ap.add_argument("--quick", action="store_true", help="one round of 2 steps")
    args = ap.parse_args()
    os.environ.setdefault("COLUMNS", "150")
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}; run bench/make_moe.py first.")
    if args.quick:
        args.rounds, args.steps = 1, 2

    import memfit.moe as moe

    probe = moe.load(args.model, "25%", prefetch=False)
    memory = probe.memfit_moe.memory()
    probe.memfit_moe.close()
    del probe
    cpu_budget = memory["resident"] + memory["expert_cache"]  # what `offload 25%` holds of the model
    floor = disk_floor_gbps(str(args.model))
    variants = ["memory", *(f"offload {b:g}%" for b in BUDGETS)] + ([] if args.no_accelerate else ["accelerate"])
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.rounds):
        for variant in variants:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(variant, args.model, args, cpu_budget, queue))
            proc.start()
            r = process_result(proc, queue, variant)
            runs[variant].append(r)
            print(f"round {i + 1}/{args.rounds} {variant:14s} " +
                  (r["error"] if "error" in r else f"{r['step_s']:.2f} s/step, "
                   f"peak {r['peak_anon_bytes'] / 1e6:.0f} MB"), flush=True)
    results = {}
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        results[v] = (min(ok, key=lambda r: r["step_s"]) | {"step_s_rounds": [r["step_s"] for r in ok]}) if ok \
            else rs[0]
    base = results["memory"]
    for v, r in results.items():
        if v.startswith("offload"):  # the same computation: the same losses, up to summation order
            worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"], strict=True))
            assert worst <= 1e-4, f"{v}: losses differ from in memory by {worst:.2e}"
    rows = []
    for v, r in results.items():
        if "error" in r:
            rows.append([v, r["error"][:40], "", "", "", "", "", "", ""])
            continue
        floor_s = base["step_s"] + r.get("read_bytes_per_step", 0) / 1e9 / floor
        rows.append([v, r["step_s"], r["step_s"] / base["step_s"], r["step_s"] / floor_s,
                     r["disk_bytes_per_step"] / 1e6, f"{100 * r.get('forward_hit_ratio', 1):.1f}%",
                     f"{100 * r.get('backward_hit_ratio', 1):.1f}%", r.get("stall_s_per_step", 0.0),
                     r["peak_anon_bytes"] / 1e6])
    payload = {"model": str(args.model), "memory": memory, "cpu_budget_bytes": cpu_budget, "disk_floor_gbps": floor,
               "batch": args.batch, "seq": args.seq, "threads": args.threads, "lora": {"r": 16, "targets": TARGETS},
               "results": results}
    path = report("moe_train", f"LoRA fine-tune step, experts {memory['experts_total'] / 1e6:.0f} MB of "
                  f"{(memory['experts_total'] + memory['resident']) / 1e6:.0f} MB, batch {args.batch}x{args.seq}; "
                  f"disk floor {floor:.2f} GB/s",
                  ["variant", "s/step", "x mem", "x floor", "disk MB/step", "hit fwd", "hit bwd", "stall s",
                   "peak MB"], rows, payload)
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
