"""Train a small MoE causal LM on real English text, so routing is realistic enough to judge caches and predictors.

Tiny random MoE models route almost at random; a model trained on text routes by content (code vs prose,
topic, syntax), as real MoE models do. This script, deterministically and on CPU in a few minutes:

  1. gathers real text on disk: Debian package descriptions (data/*.jsonl) and the docstrings of Python's
     standard library (read with `ast` from this interpreter's own sources);
  2. splits it by a hash of each text into train (90%) and held-out (10%) parts, written as JSONL;
  3. trains a byte-level BPE tokenizer on the train part;
  4. trains a Mixtral-style MoE (default 8 layers, 16 experts, top-2) with the router's load-balancing loss;
  5. saves it with save_pretrained: per-expert keys on disk, sharded, with the tokenizer.

Traces and predictors are trained on the train part and measured on the held-out part (bench/moe.py).

    .venv/bin/python bench/make_moe.py --out runs/moe-model      # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import (  # noqa: E402
    ROOT,
    batches,
    debian_descriptions,
    pretrain_args,
    split,
    stdlib_docstrings,
    token_stream,
    train_tokenizer,
    warmup_cosine,
)

PRESETS = {
    "default": {"hidden": 256, "inter": 512, "layers": 8, "experts": 16, "top_k": 2, "heads": 4, "vocab": 4096,
                "seq": 64, "batch": 8, "steps": 150, "lr": 3e-3},
    "quick": {"hidden": 64, "inter": 128, "layers": 4, "experts": 8, "top_k": 2, "heads": 4, "vocab": 1024,
              "seq": 64, "batch": 8, "steps": 30, "lr": 3e-3},
}


def main() -> None:
    args, p = pretrain_args(__doc__, ROOT / "runs" / "moe-model", PRESETS)
    from transformers import MixtralConfig, MixtralForCausalLM

    t0 = time.perf_counter()
    train_texts, test_texts = split(stdlib_docstrings() + debian_descriptions())
    text_dir = args.out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", train_texts), ("heldout", test_texts)):
        (text_dir / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(train_texts, p["vocab"], args.out)
    ids = token_stream(tok, train_texts)
    print(f"text: {len(train_texts)} train / {len(test_texts)} held-out texts, {ids.numel()} train tokens "
          f"({time.perf_counter() - t0:.0f} s)")

    config = MixtralConfig(
        vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["inter"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], num_key_value_heads=p["heads"], num_local_experts=p["experts"],
        num_experts_per_tok=p["top_k"], max_position_embeddings=1024, router_aux_loss_coef=0.02,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = MixtralForCausalLM(config)
    model.set_experts_implementation("grouped_mm")  # measured: backward 2.5x faster than eager on CPU here
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(p["steps"]))
    model.train()
    t1 = time.perf_counter()
    for step, batch in enumerate(batches(ids, p["seq"], p["batch"], p["steps"], args.seed)):
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == p["steps"] - 1:
            print(f"step {step:4d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"{time.perf_counter() - t1:.0f} s", flush=True)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out, max_shard_size="64MB")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {total / 1e6:.1f}M parameters, experts {experts / total:.0%} of them "
          f"({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
