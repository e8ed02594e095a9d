"""Frozen-weight streaming vs the model in memory: LoRA fine-tune step time, peak memory, bytes read.

Variants, each in a fresh process per round (RSS high-water marks and allocator caches do not leak between them):
    memory       all weights resident, no recomputation (the baseline)
    memory+ckpt  all weights resident, per-layer activation checkpointing (isolates the recompute cost)
    stream       weights streamed from disk under a budget of --budget-frac of the weights (default 25%)

Streamed reads drop their pages from the page cache (posix_fadvise), so the bytes read per step come
from the disk (the kernel's read_bytes counter of /proc/self/io says so), and the disk read floor is a
cold sequential read of the checkpoint measured in the same run.

    .venv/bin/python bench/stream.py            # ~3 min on 2 CPU cores; on a GPU: --device cuda (default there)
    .venv/bin/python bench/stream.py --quick    # smaller model, for a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    disk_floor_gbps,
    disk_read_bytes,
    md_table,
    peak_rss_bytes,
    print_readme_tables,
    process_result,
    report,
    reset_peak_rss,
    rss_bytes,
)

VARIANTS = ["memory", "memory+ckpt", "stream"]
SIZES = {
    "default": {"hidden": 1024, "inter": 2816, "layers": 12, "vocab": 4000, "batch": 1, "seq": 64, "steps": 4},
    "large": {"hidden": 2048, "inter": 5632, "layers": 16, "vocab": 8000, "batch": 4, "seq": 512, "steps": 4},
    "quick": {"hidden": 512, "inter": 1408, "layers": 16, "vocab": 2000, "batch": 1, "seq": 32, "steps": 3},
}


def _config(size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
                       num_hidden_layers=size["layers"], num_attention_heads=size["hidden"] // 64,
                       num_key_value_heads=size["hidden"] // 64, tie_word_embeddings=False)


def _peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()


def run_variant(variant: str, ckpt: str, size: dict, frac: float, device: str, queue) -> None:
    import torch
    from transformers import LlamaForCausalLM

    import memfit
    from memfit.tiers.files import load_tensors
    from memfit.tiers.modules import empty_weights
    from memfit.tiers.st_reader import checkpoint_files

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    with empty_weights():
        model = LlamaForCausalLM(_config(size))
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    base = rss_base = rss_bytes()
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    handle = None
    if variant == "stream":
        handle = memfit.stream_weights(model, ckpt, int(frac * weight_bytes), device=device)
    else:
        state = {}
        for f in checkpoint_files(ckpt):
            state.update(load_tensors(f, device=device))
        model.load_state_dict(state, assign=True)
        del state
        if variant == "memory+ckpt":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)  # buffers (rotary) to the device
    torch.manual_seed(1)
    memfit.inject(model, memfit.LoraConfig(r=16, dropout=0.05, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(0))
    x = x.to(device)

    def step() -> float:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # warm-up: optimizer state, grads, the first read of layer 0
    if handle is not None:
        handle.stats.reset()
    disk0, times = disk_read_bytes(), []
    for _ in range(size["steps"]):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    steps = size["steps"]
    result = {"variant": variant, "step_s": statistics.median(times), "peak_bytes": _peak(device) - base,
              "peak_rss_bytes": peak_rss_bytes() - rss_base,
              "weight_bytes": weight_bytes, "disk_read_per_step": (disk_read_bytes() - disk0) / steps,
              "losses": losses}
    if handle is not None:
        s = handle.stats
        result |= {"budget": handle.budget, "memory": handle.memory(), "read_per_step": s.bytes_read / steps,
                   "read_gbps": s.bytes_read / max(s.read_s, 1e-9) / 1e9, "wait_per_step_s": s.wait_s / steps,
                   "sync_reads": s.sync_reads}
    queue.put(result)


README_LABELS = {"memory": "all weights in memory", "memory+ckpt": "in memory + per-layer activation checkpointing"}


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/stream.json alone (bench/readme_check.py compares the two)."""
    results = payload["results"]
    base = results["memory"]
    rows = []
    for name, r in results.items():
        peak, peak_x = f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}"
        label = README_LABELS.get(name, name)
        if name == "stream":  # the point of the table: its memory, in bold
            label, peak, peak_x = f"**streamed, {payload['budget_frac']:.0%} budget**", f"**{peak}**", f"**{peak_x}**"
        rows.append([label, f"{r['step_s']:.3f}", f"{r['step_s'] / base['step_s']:.2f}", peak, peak_x,
                     f"{r.get('read_per_step', 0) / 1e6:.0f}", f"{r['disk_read_per_step'] / 1e6:.0f}"])
    header = ["variant", "s/step", "÷ memory", "peak RSS MB", "÷ memory", "read MB/step", "disk MB/step"]
    return {"step": md_table(header, "lrrrrrr", rows)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model preset (large: 3.3 GB, for a GPU)")
    ap.add_argument("--budget-frac", type=float, default=0.25, help="weights budget as a fraction of all weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per variant; the fastest is kept")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = ap.parse_args()
    size = SIZES[args.size or ("quick" if args.quick else "default")]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=args.dir) as ckpt:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(_config(size)).save_pretrained(ckpt, max_shard_size="200MB")
        floor = disk_floor_gbps(ckpt)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):  # rounds interleave the variants, so machine noise hits all alike
            for variant in VARIANTS:
                queue = ctx.Queue()
                proc = ctx.Process(target=run_variant,
                                   args=(variant, ckpt, size, args.budget_frac, args.device, queue))
                proc.start()
                runs[variant].append(process_result(proc, queue, variant))
    results = {v: min(rs, key=lambda r: r["step_s"]) | {"step_s_rounds": [r["step_s"] for r in rs]}
               for v, rs in runs.items()}
    base, stream = results["memory"], results["stream"]
    assert stream["losses"] == base["losses"], "streamed losses differ from in-memory losses"
    rows = []
    for name, r in results.items():
        rows.append([name, r["step_s"], r["step_s"] / base["step_s"], r["peak_bytes"] / 1e6,
                     r["peak_bytes"] / base["peak_bytes"], r["peak_rss_bytes"] / 1e6, r.get("read_per_step", 0) / 1e6,
                     r["disk_read_per_step"] / 1e6, r.get("read_gbps", float("nan"))])
    floor_s = stream["read_per_step"] / 1e9 / floor
    # read/disk MB: bytes per step streamed by memfit / read from the block device (/proc/self/io read_bytes).
    path = report("stream", f"LoRA fine-tune step, {base['weight_bytes'] / 1e6:.0f} MB of weights, budget "
                  f"{args.budget_frac:.0%} ({stream['budget'] / 1e6:.0f} MB), device {args.device}; disk floor "
                  f"{floor:.2f} GB/s = {floor_s:.2f} s/step of reads",
                  ["variant", "s/step", "x mem", "peak MB", "x mem", "RSS MB", "read MB", "disk MB", "GB/s"],
                  rows, {"size": size, "budget_frac": args.budget_frac, "device": args.device,
                         "disk_floor_gbps": floor, "read_floor_s_per_step": floor_s, "results": results})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
