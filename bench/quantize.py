"""A LoRA fine-tune of SmolLM2-135M-Instruct on an fp32, an int8 and an NF4 base (memfit.quant).

Each base is written once by `memfit quantize` (NF4 with double quantization, int8, blocks of 64; the tied
embedding/head stays fp32, except in the nf4+emb row: --embeddings) and every run loads its checkpoint in a fresh
process, so its peak RSS is its own and the quantized runs never hold the fp32 weights. Task: causal-LM on the
shipped debian-sections synopses, six per training row (about 128 tokens), batch 4 x 128, LoRA r=16 on all seven
projections, the same updates, seed, batches and learning rate for every row (only the base differs). Held-out loss
on 300 validation synopses, for the base as is and after the fine-tune. Step time and peak RSS are ratios to the
fp32 row of the same run. Streaming: the same fine-tune (10 updates) with every decoder layer read from disk per use
(`--weights-budget` at its minimum), fp32 against NF4 (and NF4 with the vocabulary streamed too): disk bytes per
update (the reader's counter) and s/update. MoE: the bench/make_moe.py model decoding held-out text with its experts
offloaded (predictive policy, cross-layer prefetch, reads kept out of the page cache), fp32 experts at a 25% budget
against NF4 experts at the same bytes and at 25% of their own bytes; runners take turns window by window.
Quality without SmolLM2's confound (its fp32 weights are dequantized Q4_1): LoRA on MiniLM-L6 classifying the
debian-sections synopses, fp32 against NF4 base.

    .venv/bin/python bench/quantize.py           # ~15 min on 2 CPU cores (the MoE part needs bench/make_moe.py)
    .venv/bin/python bench/quantize.py --only moe  # one part again, merged into results/quantize.json
    .venv/bin/python bench/quantize.py --quick   # 5 updates: a smoke run
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
WORK = ROOT / "runs" / "quant-bench"
MiB = 2**20
STEPS, BATCH, LENGTH, PER_ROW, VAL_ROWS, LR = 40, 4, 128, 6, 300, 1e-3
STREAM_STEPS = 10
MOE_MODEL, MOE_BUDGET, MOE_WINDOWS, MOE_PREFILL, MOE_DECODE = ROOT / "runs" / "moe-model", 0.25, 6, 16, 48
PARTS = ("runs", "stream", "quality", "moe")
QUALITY_STEPS = 200
KINDS = ["fp32", "int8", "nf4", "nf4+emb"]  # nf4+emb: the tied embedding/head quantized too (--embeddings)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data() -> tuple[Path, Path]:
    from memfit.cli.demo import DATA

    WORK.mkdir(parents=True, exist_ok=True)
    train, val = WORK / "train.jsonl", WORK / "val.jsonl"
    if not train.is_file():
        texts = [json.loads(line)["text"] for line in (DATA / "debian-sections-train.jsonl").read_text().splitlines()]
        groups = ["\n".join(texts[i:i + PER_ROW]) for i in range(0, len(texts) - PER_ROW + 1, PER_ROW)]
        train.write_text("".join(json.dumps({"text": g}) + "\n" for g in groups))
    if not val.is_file():
        rows = [json.loads(line) for line in (DATA / "debian-sections-val.jsonl").read_text().splitlines()][:VAL_ROWS]
        val.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return train, val


def base_dir(kind: str) -> Path:
    fp32 = smollm2_dir(ROOT / "runs" / "zo-bench")
    if kind == "fp32":
        return fp32
    from memfit.quant import QuantConfig
    from memfit.quant.checkpoint import is_quantized_dir, quantize_checkpoint

    out = WORK / f"smollm2-{kind}"
    if not is_quantized_dir(out):
        config = QuantConfig(kind=kind.removesuffix("+emb"), embeddings=kind.endswith("+emb"))
        quantize_checkpoint(fp32, out, config, overwrite=True)
    return out


def frozen_bytes(model) -> dict:
    """Bytes of the Linear weights (quantized or not; the tied head counted once, with the embedding) and of every
    tensor of the base model (all frozen in a LoRA fine-tune)."""
    from torch import nn

    from memfit.quant import QuantWeight

    seen, linear = set(), 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and id(w) not in seen and module is not model.get_output_embeddings():
            seen.add(id(w))
            linear += w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"linear_bytes": linear, "frozen_bytes": total}


def run(kind: str, steps: int) -> dict:
    """One fine-tune in this process, plus the base's held-out loss and frozen bytes."""
    import resource

    import torch

    import memfit
    from memfit.local import load_tokenizer
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune, load_base
    from memfit.train.tasks import CausalLM

    torch.set_num_threads(2)
    model_dir = base_dir(kind)
    train, val = _data()
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, eval_batch_size=16, lr=LR, max_length=LENGTH,
                      log_every=10**9, checkpoint_every=10**9, eval_every=10**9, seed=0)
    adapter = memfit.LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    s = finetune(model_dir, train, WORK / f"run-{kind}", adapter, cfg, eval_data=val, quiet=True, overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = load_base(model_dir, CausalLM())[0].eval()
    return {"kind": kind, "eval_loss": s["eval_loss"], "base_loss": heldout_loss(base, load_tokenizer(model_dir), val,
                                                                                 64, batch=16),
            "peak_rss_train": s["peak_mem_bytes"], "peak_rss_process": peak, "s_per_step": s["train_time_s"] / steps,
            **frozen_bytes(base)}


def stream_run(kind: str, steps: int) -> dict:
    """The same fine-tune with every decoder layer streamed from disk (the smallest budget: the resident part and
    two layers), in this process: disk bytes read per update, s/update and peak RSS. `kind` "nf4+vocab": the NF4
    base at a budget that holds neither the tied embedding nor the head, so they stream too (rows per lookup, the
    head in vocabulary chunks by the loss)."""
    import gc
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    import memfit
    from memfit.local import from_pretrained
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune

    torch.set_num_threads(2)
    base, vocab = kind.removesuffix("+vocab"), kind.endswith("+vocab")
    model_dir = base_dir(base)
    train, val = _data()
    model = from_pretrained(AutoModelForCausalLM, model_dir)
    layers = model.model.layers
    layer = sum(t.numel() * t.element_size() for t in [*layers[0].parameters(), *layers[0].buffers()])
    budget = frozen_bytes(model)["frozen_bytes"] - (len(layers) - 2) * layer + 2**20  # streams all but none
    if vocab:
        budget -= model.get_input_embeddings().weight.nbytes  # tied: the head's weight too
    del model, layers
    gc.collect()
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, lr=LR, max_length=LENGTH, log_every=10**9,
                      checkpoint_every=10**9, eval_every=10**9, seed=0, weights_budget=budget)
    adapter = memfit.LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    s = finetune(model_dir, train, WORK / f"stream-{kind}", adapter, cfg, quiet=True, overwrite=True)
    return {"kind": kind, "budget": budget, "disk_per_step": s["stream"]["bytes_read"] / steps,
            "vocab_streamed": s["stream"]["vocab"], "s_per_step": s["train_time_s"] / steps,
            "train_loss": s.get("train_loss"), "peak_rss_train": s["peak_mem_bytes"],
            "peak_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def quality_run(kind: str, steps: int) -> dict:
    """LoRA (r=8, query/value, and the new classifier) on MiniLM-L6, a model trained in 16/32 bits, classifying the
    shipped debian-sections synopses, on its fp32 or its NF4 base (quantized at load): the QLoRA quality question
    without SmolLM2's confound (its fp32 weights are already dequantized 4-bit ones)."""
    import torch

    import memfit
    from memfit.cli.demo import DATA, minilm_dir
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune

    torch.set_num_threads(2)
    cfg = TrainConfig(max_steps=steps, batch_size=32, lr=3e-3, eval_batch_size=128, max_length=64, seed=0,
                      log_every=10**9, checkpoint_every=10**9, eval_every=10**9,
                      quantize=None if kind == "fp32" else kind)
    adapter = memfit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    s = finetune(minilm_dir(), DATA / "debian-sections-train.jsonl", WORK / f"minilm-{kind}", adapter, cfg,
                 eval_data=DATA / "debian-sections-val.jsonl", task="classify", quiet=True, overwrite=True)
    return {"kind": kind, "eval_loss": s["eval_loss"], "eval_accuracy": s["eval_accuracy"],
            "eval_macro_f1": s["eval_macro_f1"], "s_per_step": s["train_time_s"] / steps}


def moe_run(windows: int) -> list[dict]:
    """Offloaded decoding of the make_moe.py model, fp32 against NF4 experts, interleaved window by window."""
    import torch
    from moe import Runner, _drop_page_cache, _tokenizer, heldout_windows

    import memfit.moe as moe
    from memfit.quant import QuantConfig
    from memfit.quant.checkpoint import is_quantized_dir, quantize_checkpoint
    from memfit.tiers.st_reader import checkpoint_files

    torch.set_num_threads(1)  # fastest for decode on 2 cores (bench/moe.py)
    nf4 = WORK / "moe-nf4"
    if not is_quantized_dir(nf4):
        quantize_checkpoint(MOE_MODEL, nf4, QuantConfig(kind="nf4"), overwrite=True)

    def load(path: Path, budget: str) -> Runner:
        model = moe.load(path, budget, "predictive", "cross-layer", drop_cache=True)
        return Runner(model, model.memfit_moe)

    pct = f"{MOE_BUDGET * 100:g}%"
    runners = {"fp32 experts": load(MOE_MODEL, pct)}
    same = int(MOE_BUDGET * runners["fp32 experts"].runtime.store.total_bytes)  # fp32's budget, in bytes
    runners["NF4 experts, same bytes"] = load(nf4, str(same))
    runners[f"NF4 experts, {pct} of theirs"] = load(nf4, pct)
    files = checkpoint_files(MOE_MODEL) + checkpoint_files(nf4)
    for w in heldout_windows(MOE_MODEL, _tokenizer(MOE_MODEL), windows, MOE_PREFILL + MOE_DECODE):
        for runner in runners.values():
            _drop_page_cache(files)
            runner.run(w, MOE_PREFILL)
    rows = []
    for name, runner in runners.items():
        m = runner.runtime.memory()
        r = runner.result()
        rows.append({"variant": name, "budget_bytes": m["expert_cache"], "slots": m["slots"],
                     "expert_bytes": m["expert"], "experts_total_bytes": m["experts_total"],
                     **{k: r[k] for k in ("decode_tok_s", "hit_ratio", "bytes_per_token", "disk_bytes_per_token",
                                          "tokens")}})
        runner.close()
    return rows


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/quantize.json alone (bench/readme_check.py compares the two)."""
    runs = {r["kind"]: r for r in payload["runs"]}
    ref = runs.get("fp32")
    rows = []
    for kind in KINDS:
        r = runs.get(kind)
        if r is None or ref is None:
            continue
        saved = ref["frozen_bytes"] - r["frozen_bytes"]
        drop = ref["peak_rss_process"] - r["peak_rss_process"]
        rows.append([kind, f"{r['linear_bytes'] / MiB:.1f}", f"{r['linear_bytes'] / ref['linear_bytes']:.3f}",
                     f"{r['frozen_bytes'] / MiB:.1f}", f"{r['frozen_bytes'] / ref['frozen_bytes']:.3f}",
                     f"{r['peak_rss_process'] / MiB:,.0f}", f"{drop / saved:.2f}" if saved > 0 else "",
                     f"{r['s_per_step']:.2f}", f"{r['s_per_step'] / ref['s_per_step']:.2f}",
                     f"{r['base_loss']:.4f}", f"{(r['base_loss'] / ref['base_loss'] - 1) * 100:+.2f}%",
                     f"{r['eval_loss']:.4f}", f"{(r['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%"])
    header = ["base", "Linear weights MiB", "÷ fp32", "all frozen MiB", "÷ fp32", "peak RSS MiB",
              "RSS drop ÷ bytes saved", "s/step", "÷ fp32", "base held-out loss", "vs fp32", "after LoRA", "vs fp32"]
    tables = {"quantize": md_table(header, "lrrrrrrrrrrrr", rows)}
    streams = {r["kind"]: r for r in payload.get("stream", [])}
    if "fp32" in streams:
        ref = streams["fp32"]
        rows = [[kind, f"{r['budget'] / MiB:.0f}", f"{r['disk_per_step'] / MiB:,.0f}",
                 f"{r['disk_per_step'] / ref['disk_per_step']:.3f}", f"{r['s_per_step']:.2f}",
                 f"{r['s_per_step'] / ref['s_per_step']:.2f}",
                 f"{r['peak_rss_process'] / MiB:,.0f}" if "peak_rss_process" in r else "",
                 f"{r['peak_rss_process'] / ref['peak_rss_process']:.2f}" if "peak_rss_process" in r
                 and "peak_rss_process" in ref else ""] for kind, r in streams.items()]
        tables["stream"] = md_table(["base, every layer streamed", "budget MiB", "disk MiB/step", "÷ fp32",
                                     "s/step", "÷ fp32", "peak RSS MiB", "÷ fp32"], "lrrrrrrr", rows)
    quality = {r["kind"]: r for r in payload.get("quality", [])}
    if "fp32" in quality:
        ref = quality["fp32"]
        rows = [[kind, f"{r['eval_loss']:.4f}", f"{(r['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%",
                 f"{r['eval_accuracy']:.3f}", f"{r['eval_macro_f1']:.3f}", f"{r['s_per_step']:.2f}"]
                for kind, r in quality.items()]
        tables["quality"] = md_table(["MiniLM-L6 base, LoRA r=8", "held-out loss", "vs fp32", "accuracy", "macro-F1",
                                      "s/step"], "lrrrrr", rows)
    experts = payload.get("moe", [])
    if experts:
        ref = experts[0]
        rows = [[r["variant"], f"{r['budget_bytes'] / MiB:.1f}", f"{r['slots']}",
                 f"{r['slots'] * r['expert_bytes'] / r['experts_total_bytes'] * 100:.0f}%",
                 f"{r['hit_ratio'] * 100:.1f}%", f"{r['bytes_per_token'] / MiB:.2f}",
                 f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}"] for r in experts]
        tables["moe"] = md_table(["offloaded MoE decode", "expert cache MiB", "experts cached", "of all experts",
                                  "hit ratio", "expert MiB read/token", "tok/s", "÷ fp32"], "lrrrrrrr", rows)
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 updates")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run this part only (repeatable); the others are kept from the existing results file")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        spec = json.loads(args.run)
        if spec["part"] == "moe":
            print(json.dumps(moe_run(spec["steps"])))
        elif spec["part"] == "quality":
            print(json.dumps(quality_run(spec["kind"], spec["steps"])))
        else:
            print(json.dumps((stream_run if spec["part"] == "stream" else run)(spec["kind"], spec["steps"])))
        return
    steps = 5 if args.quick else STEPS
    parts = args.only or PARTS
    if "moe" in parts and not (MOE_MODEL / "config.json").is_file():
        sys.exit(f"no MoE model at {MOE_MODEL}: run bench/make_moe.py --out {MOE_MODEL.relative_to(ROOT)} first.")
    for kind in KINDS:  # written once, outside the measured processes
        base_dir(kind)
    path = RESULTS / ("quantize-quick.json" if args.quick else "quantize.json")
    payload = json.loads(path.read_text()) if args.only and path.is_file() else {}
    payload |= {"machine": machine(), "steps": steps, "batch": BATCH, "length": LENGTH, "lr": LR}
    start = time.perf_counter()
    plan = [("runs", kind, steps) for kind in KINDS] + [("stream", kind, min(steps, STREAM_STEPS))
                                                         for kind in ("fp32", "nf4", "nf4+vocab")]
    plan += [("quality", kind, 5 if args.quick else QUALITY_STEPS) for kind in ("fp32", "nf4")]
    plan += [("moe", "fp32-nf4", 2 if args.quick else MOE_WINDOWS)]
    minutes = payload.get("minutes", {}) if isinstance(payload.get("minutes"), dict) else {}
    for part in parts:
        payload[part], t0 = [], time.perf_counter()
        for _, kind, n in (p for p in plan if p[0] == part):
            spec = json.dumps({"part": part, "kind": kind, "steps": n})
            proc = subprocess.run([sys.executable, __file__, "--run", spec], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{part} {kind}: {proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            payload[part] += result if isinstance(result, list) else [result]
            print(f"{part} {kind}: {json.dumps(result)} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        minutes[part] = round((time.perf_counter() - t0) / 60, 1)
    payload["minutes"] = minutes  # per part: what a run of it cost
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
