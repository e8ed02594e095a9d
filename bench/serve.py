"""Serving many adapters on SmolLM2-135M-Instruct: memfit's continuous mixed-adapter batches against PEFT.

Adapters: LoRA r=8 on the query and value projections, each fine-tuned by `memfit finetune` for a few updates on
its own slice of the Debian synopses (so every adapter is a real, different fine-tune; cached in runs/serve-bench).
Work: 64 chat requests (Debian synopses, "Which Debian section is this package in?"), 32 new tokens each, greedy,
spread round-robin over 1, 8 and 32 distinct adapters. Variants, in one process, interleaved per adapter count:

- memfit: the engine of `memfit serve` (continuous batching, up to 16 rows, adapters in slots, the base matmuls
  once per step); all 64 requests submitted at once;
- base alone: the same engine and requests without any adapter (the ceiling);
- PEFT, set_adapter per request: `PeftModel.set_adapter(name)` then `generate` for each request in turn, the
  usual way to serve several PEFT adapters;
- PEFT, mixed batches: `generate(..., adapter_names=[...])` on batches of 16 left-padded requests, PEFT's own
  mixed-adapter inference.

Then the HTTP server itself: 64 requests from 16 concurrent `openai` clients over 8 adapters, time to first token
p50/p95 and tokens/s. Throughput is generated tokens / wall time. Writes results/serve.json.

    .venv/bin/python bench/serve.py           # ~13 min on 2 CPU cores (fine-tuning the 32 adapters: ~6 of it)
    .venv/bin/python bench/serve.py --quick   # 16 requests, 1 and 4 adapters, 8 tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, md_table, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "serve-bench"
QUESTION = "Which Debian archive section is this package in? Package: {}"


def prepare(n_adapters: int, steps: int, work: Path) -> tuple[Path, dict[str, Path]]:
    """The converted model and `n_adapters` LoRA adapters fine-tuned by memfit (and their PEFT exports)."""
    import memfit
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune, load_finetuned

    model_dir = smollm2_dir(WORK)
    rows = [json.loads(line) for line in (ROOT / "data" / "debian-sections-train.jsonl").read_text().splitlines()]
    adapters = {}
    for i in range(n_adapters):
        run = work / f"adapter{i}"
        if not (run / "peft" / "adapter_model.safetensors").is_file():
            part = [{"prompt": QUESTION.format(r["text"]), "completion": r["label"]} for r in rows[i * 64:(i + 1) * 64]]
            data = work / f"data{i}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text("".join(json.dumps(r) + "\n" for r in part))
            finetune(model_dir, data, run, memfit.LoraConfig(r=8, alpha=16), TrainConfig(
                max_steps=steps, batch_size=8, lr=2e-3, seed=i, max_length=64, checkpoint_every=10**9), quiet=True,
                overwrite=True)
            memfit.export_peft(load_finetuned(run), run / "peft")
            print(f"fine-tuned adapter {i + 1}/{n_adapters}", flush=True)
        adapters[f"adapter{i}"] = run
    return model_dir, adapters


def requests(tokenizer, n: int) -> list[list[int]]:
    from memfit.serve.text import chat_ids

    rows = [json.loads(line) for line in (ROOT / "data" / "debian-sections-val.jsonl").read_text().splitlines()]
    return [chat_ids(tokenizer, [{"role": "user", "content": QUESTION.format(r["text"])}]) for r in rows[:n]]


def run_memfit(model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]], names: list[str | None],
               new_tokens: int) -> dict:
    from memfit.serve.engine import Request, SamplingParams
    from memfit.serve.loading import ServeConfig, build_engine

    used = sorted({n for n in names if n})
    engine, _, _ = build_engine(model_dir, ServeConfig(adapters={n: str(adapters[n]) for n in used},
                                                       serve_adapters=bool(used), max_loras=max(1, min(16, len(used))),
                                                       max_seqs=16, kv_budget=16 * 256))
    warm = engine.submit(Request(prompts[0], SamplingParams(max_new_tokens=2), names[0]))
    engine.run_until_done()
    t0 = time.perf_counter()
    done = [engine.submit(Request(p, SamplingParams(max_new_tokens=new_tokens), n))
            for p, n in zip(prompts, names, strict=True)]
    engine.run_until_done()
    seconds = time.perf_counter() - t0
    del warm
    tokens = sum(len(r.generated) for r in done)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "outputs": [r.generated for r in done]}


def _peft_model(model_dir: Path, adapters: dict[str, Path], used: list[str]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapters[used[0]] / "peft", adapter_name=used[0])
    for name in used[1:]:
        model.load_adapter(adapters[name] / "peft", adapter_name=name)
    return model.eval()


def run_peft_switching(model, prompts, names, new_tokens: int, pad: int) -> dict:
    import torch

    t0, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p, n in zip(prompts, names, strict=True):
            model.set_adapter(n)
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)
            tokens += out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_peft_mixed(model, prompts, names, new_tokens: int, pad: int, batch: int = 16) -> dict:
    import torch

    t0, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            rows, who = prompts[s:s + batch], names[s:s + batch]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad, adapter_names=who)
            new = out[:, width:]
            tokens += int((new != pad).sum())
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_http(model_dir: Path, adapters: dict[str, Path], prompts_text: list[str], n_adapters: int, new_tokens: int,
             clients: int = 16) -> dict:
    """The real server under concurrency: time to first token and throughput as clients see them."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn
    from openai import OpenAI

    from memfit.serve.app import ServerState, build_app
    from memfit.serve.loading import ServeConfig, build_engine

    used = [f"adapter{i}" for i in range(n_adapters)]
    engine, tokenizer, name = build_engine(model_dir, ServeConfig(adapters={n: str(adapters[n]) for n in used},
                                                                  max_loras=n_adapters, max_seqs=16, kv_budget=4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(ServerState(engine.start(), tokenizer, name)), port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        first, n = None, 0
        stream = client.chat.completions.create(model=used[i % n_adapters], stream=True, max_tokens=new_tokens,
                                                temperature=0, messages=[{"role": "user", "content":
                                                                          prompts_text[i]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - t0
                n += 1
        return first or 0.0, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(prompts_text))))
    seconds = time.perf_counter() - t0
    server.should_exit = True
    thread.join()
    engine.stop()
    ttft = sorted(r[0] for r in results)
    generated = engine.metrics.generated_tokens._value.get()
    return {"clients": clients, "adapters": n_adapters, "requests": len(results), "seconds": seconds,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[int(0.95 * (len(ttft) - 1))],
            "tokens_per_s": generated / seconds}


def readme_tables(payload: dict) -> dict[str, str]:
    rows = []
    for r in payload["runs"]:
        rows.append([str(r["adapters"]), f"{r['memfit']['tokens_per_s']:.1f}", f"{r['base']['tokens_per_s']:.1f}",
                     f"{r['memfit']['tokens_per_s'] / r['base']['tokens_per_s']:.2f}",
                     f"{r['peft_switch']['tokens_per_s']:.1f}",
                     f"{r['memfit']['tokens_per_s'] / r['peft_switch']['tokens_per_s']:.1f}x",
                     f"{r['peft_mixed']['tokens_per_s']:.1f}",
                     f"{r['memfit']['tokens_per_s'] / r['peft_mixed']['tokens_per_s']:.2f}x"])
    header = ["adapters", "memfit tok/s", "base alone tok/s", "memfit ÷ base", "PEFT set_adapter tok/s",
              "memfit ÷ PEFT set_adapter", "PEFT mixed batch tok/s", "memfit ÷ PEFT mixed"]
    h = payload["http"]
    http = md_table(["clients", "adapters", "requests", "TTFT p50", "TTFT p95", "tokens/s"], "rrrrrr",
                    [[str(h["clients"]), str(h["adapters"]), str(h["requests"]), f"{h['ttft_p50_s']:.2f} s",
                      f"{h['ttft_p95_s']:.2f} s", f"{h['tokens_per_s']:.1f}"]])
    return {"throughput": md_table(header, "rrrrrrrr", rows), "http": http}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from memfit.local import load_tokenizer

    torch.set_num_threads(args.threads)
    counts, n_requests, new_tokens, steps = ([1, 4], 16, 8, 3) if args.quick else ([1, 8, 32], 64, 32, 12)
    model_dir, adapters = prepare(max(counts), steps, WORK / ("quick" if args.quick else "full"))
    tokenizer = load_tokenizer(model_dir)
    prompts = requests(tokenizer, n_requests)
    pad = tokenizer.pad_token_id
    runs = []
    for count in counts:
        names = [f"adapter{i % count}" for i in range(n_requests)]
        used = sorted(set(names))
        peft = _peft_model(model_dir, adapters, used)
        result = {"adapters": count,
                  "memfit": run_memfit(model_dir, adapters, prompts, names, new_tokens),
                  "base": run_memfit(model_dir, adapters, prompts, [None] * n_requests, new_tokens),
                  "peft_mixed": run_peft_mixed(peft, prompts, names, new_tokens, pad),
                  "peft_switch": run_peft_switching(peft, prompts, names, new_tokens, pad)}
        for key in ("memfit", "base"):
            result[key].pop("outputs")
        del peft
        runs.append(result)
        print(f"{count} adapters: memfit {result['memfit']['tokens_per_s']:.1f} tok/s, base "
              f"{result['base']['tokens_per_s']:.1f}, PEFT switch {result['peft_switch']['tokens_per_s']:.1f}, "
              f"PEFT mixed {result['peft_mixed']['tokens_per_s']:.1f}", flush=True)
    texts = [json.loads(line)["text"] for line in
             (ROOT / "data" / "debian-sections-val.jsonl").read_text().splitlines()[:n_requests]]
    http = run_http(model_dir, adapters, [QUESTION.format(t) for t in texts], min(8, max(counts)), new_tokens)
    payload = {"machine": machine(), "quick": args.quick, "requests": n_requests, "new_tokens": new_tokens,
               "finetune_steps": steps, "runs": runs, "http": http}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(payload, indent=2) + "\n")
    for key, table in readme_tables(payload).items():
        print(f"<!-- results/serve.json: {key} -->\n{table}\n<!-- /results -->")


if __name__ == "__main__":
    main()
