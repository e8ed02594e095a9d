"""Train-step time and peak memory: memfit LoRA vs PEFT LoRA, and MoS vs LoRA at the same active rank.

Each variant runs in its own fresh process (so allocator caches and the RSS high-water mark do not
leak between variants); rounds are interleaved and each keeps its median step time. A time ratio is the
median over rounds of the ratio within a round (variants of one round run back to back, so a slow spell of
the machine shifts both sides of a ratio alike), so the ratios come from one run under the same conditions.
Memory is given twice: the process's peak RSS (model build included, the same for every variant; on a GPU
the allocator's peak) and the bytes autograd saves for backward in one step, parameters excluded: the part
an adapter adds, measured exactly rather than read off an RSS delta.

    .venv/bin/python bench/adapters_step.py            # ~5 min on 2 CPU cores
    .venv/bin/python bench/adapters_step.py --quick    # smaller model, for a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, peak_rss_bytes, print_readme_tables, report  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["peft-lora", "memfit-lora", "memfit-mos"]
MOS_SHARDS = 4  # l: pieces per rank vector


def build_model(size: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                      intermediate_size=(size["hidden"] * 8 // 3 + 63) // 64 * 64,
                      num_hidden_layers=size["layers"], num_attention_heads=size["hidden"] // 64,
                      num_key_value_heads=size["hidden"] // 64)
    return LlamaForCausalLM(cfg)


def mos_ranks(r: int, layers: int) -> tuple[int, int]:
    """(r_eq, r_pri) of the MoS variant: a quarter of LoRA's parameters at the same active rank r (r_eq = r/4);
    one private rank vector per layer when the public pool still holds the r - 1 others each layer draws,
    (r_eq - 1)·L >= r - 1."""
    r_eq = max(1, r // 4)
    return r_eq, 1 if (r_eq - 1) * layers >= r - 1 else 0


def adapt(variant: str, model, r: int):
    if variant == "peft-lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.05, target_modules=PROJ))
    import memfit

    if variant == "memfit-lora":
        return memfit.inject(model, memfit.LoraConfig(r=r, alpha=16, dropout=0.05, target_modules=PROJ))
    r_eq, r_pri = mos_ranks(r, model.config.num_hidden_layers)
    return memfit.inject(model, memfit.MoSConfig(r=r, r_eq=r_eq, r_pri=r_pri, shards=MOS_SHARDS, alpha=16, dropout=0.05,
                                                 target_modules=PROJ))


def saved_activation_bytes(model, step) -> int:
    """Bytes autograd keeps for backward during one step, parameters excluded (they are resident anyway).

    Deterministic, unlike an RSS delta, which moves with what the allocator happens to hand back to the OS.
    """
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_variant(variant: str, size: dict, steps: int, queue) -> None:
    import torch

    torch.set_num_threads(size["threads"])
    model = adapt(variant, build_model(size), size["r"]).train()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen).to(device)

    def step() -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state and grads
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # Process peak since start (model build included, the same for every variant), or the allocator's on a GPU.
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    queue.put({"variant": variant, "step_s": statistics.median(times), "peak_bytes": peak,
               "saved_bytes": saved_activation_bytes(model, step), "trainable": sum(p.numel() for p in params)})


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/adapters_step.json alone (bench/readme_check.py compares the two)."""
    size, res, ratios = payload["size"], payload["results"], payload["ratios"]
    r_eq, r_pri = mos_ranks(size["r"], size["layers"])
    labels = {"peft-lora": f"PEFT LoRA r={size['r']}", "memfit-lora": f"memfit LoRA r={size['r']}",
              "memfit-mos": f"memfit MoS r={size['r']} (r_eq={r_eq}, r_pri={r_pri}, l={MOS_SHARDS})"}
    rows = [[labels.get(v, v), f"{x['trainable']:,}", f"{x['step_s'] * 1e3:.0f}", f"{x['peak_bytes'] / 2**20:.0f}",
             f"{x['saved_bytes'] / 2**20:.1f}"] for v, x in res.items()]
    for label, name in (("**memfit LoRA ÷ PEFT LoRA**", "memfit_lora_vs_peft"),
                        ("**MoS ÷ memfit LoRA** (same active rank)", "mos_vs_lora")):
        rows.append([label, "", *(f"**{ratios[f'{name}_{key}']:.2f}×**" for key in ("step_s", "peak_bytes",
                                                                                     "saved_bytes"))])
    header = ["variant", "trainable", "step ms", "peak RSS MiB", "saved for backward MiB"]
    return {"step": md_table(header, "lrrrr", rows)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and few steps")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    args = ap.parse_args()
    size = dict(vocab=4096, hidden=512, layers=8, seq=256, batch=4, r=16, threads=torch.get_num_threads())
    if args.quick:
        size.update(hidden=128, layers=4, seq=64, batch=2, r=8)
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(variant, size, args.steps, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"variant {variant} failed (exit code {proc.exitcode}); its traceback is above.")
            runs[variant].append(queue.get(timeout=10))
    res = {v: {"step_s": statistics.median(r["step_s"] for r in rs), "round_step_s": [r["step_s"] for r in rs],
               "peak_bytes": statistics.median(r["peak_bytes"] for r in rs), "saved_bytes": rs[0]["saved_bytes"],
               "trainable": rs[0]["trainable"]} for v, rs in runs.items()}
    pairs = {"memfit_lora_vs_peft": ("memfit-lora", "peft-lora"), "mos_vs_lora": ("memfit-mos", "memfit-lora")}
    ratios = {f"{name}_{key}": res[a][key] / max(1e-12, res[b][key]) for name, (a, b) in pairs.items()
              for key in ("peak_bytes", "saved_bytes")}
    for name, (a, b) in pairs.items():
        ratios[f"{name}_step_s"] = statistics.median(
            x["step_s"] / y["step_s"] for x, y in zip(runs[a], runs[b], strict=True))
    rows = [[v, f"{res[v]['trainable']:,}", res[v]["step_s"] * 1e3, res[v]["peak_bytes"] / 2**20,
             res[v]["saved_bytes"] / 2**20] for v in VARIANTS]
    rows += [[label, "", *(ratios[f"{name}_{key}"] for key in ("step_s", "peak_bytes", "saved_bytes"))]
             for label, name in (("memfit LoRA / PEFT LoRA", "memfit_lora_vs_peft"),
                                 ("MoS / memfit LoRA (same r)", "mos_vs_lora"))]
    path = report("adapters_step", f"Train step, Llama {size['hidden']}x{size['layers']}, r={size['r']}, "
                  "all 7 projections",
                  ["variant", "trainable", "step ms (or ratio)", "peak RSS MiB (or ratio)", "saved for backward MiB"],
                  rows, {"size": size, "results": res, "ratios": ratios, "rounds": args.rounds, "steps": args.steps})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
