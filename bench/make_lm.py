"""Pretrain a small dense causal LM on Python standard-library docstrings: the base of bench/quality.py --task lm.

No pretrained decoder can be downloaded here, so the causal-LM quality task makes its own: a Llama trained,
deterministically and in a few minutes on CPU, on the docstrings of this interpreter's standard library
(technical English about code). bench/quality.py --task lm then fine-tunes it on another domain, the
Debian package synopses of data/, and scores the validation split's loss: domain adaptation, as adapters
are used on real LLMs.

    .venv/bin/python bench/make_lm.py              # ~9 min on 2 CPU cores -> runs/lm-model
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import (  # noqa: E402
    ROOT,
    batches,
    pretrain_args,
    split,
    stdlib_docstrings,
    token_stream,
    train_tokenizer,
    warmup_cosine,
)

PRESETS = {
    # 6 layers like MiniLM-L6, so the MoS configurations of bench/quality.py fit both tasks' shard pools.
    "default": {"hidden": 256, "inter": 704, "layers": 6, "heads": 4, "vocab": 4096, "seq": 128, "batch": 16,
                "steps": 700, "lr": 3e-3},
    "quick": {"hidden": 64, "inter": 176, "layers": 6, "heads": 4, "vocab": 1024, "seq": 64, "batch": 8,
              "steps": 30, "lr": 3e-3},
}


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq: int, windows: int = 32) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches(ids, seq, 8, windows // 8, seed=1)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    args, p = pretrain_args(__doc__, ROOT / "runs" / "lm-model", PRESETS)
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    train_texts, test_texts = split(stdlib_docstrings())
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, p["vocab"], args.out)
    ids, test_ids = token_stream(tok, train_texts), token_stream(tok, test_texts)
    print(f"docstrings: {len(train_texts)} train / {len(test_texts)} held-out, {ids.numel()} train tokens")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["inter"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], num_key_value_heads=p["heads"], max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(p["steps"]))
    t1 = time.perf_counter()
    for step, batch in enumerate(batches(ids, p["seq"], p["batch"], p["steps"], args.seed)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == p["steps"] - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t1:.0f} s", flush=True)
    print(f"held-out docstring loss {heldout_loss(model, test_ids, p['seq']):.3f}")
    model.eval().save_pretrained(args.out)
    total = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {total / 1e6:.1f}M parameters ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
