"""Accuracy vs compression: STABLE-RPS against a smaller dense model with the same parameter count.

Task: the shipped Debian-sections classification (data/debian-sections-{train,val}.jsonl: synopsis ->
one of 14 sections), trained from scratch. Model: a small BERT encoder over a word vocabulary built from
the training split. For each compression c in 1, 1/4, 1/16, 1/64:

- rps:   the full-size model with every Linear and Embedding weight read from one shared memory z of
         c × (their count) entries (`memfit.compress`); the parameter count is z plus the dense rest
         (LayerNorms, biases);
- dense: the same architecture with the hidden size shrunk to the largest one whose parameter count
         does not exceed the RPS model's.

Both train with the same recipe and seed; the table shows validation accuracy and macro-F1 (classes are
imbalanced), the parameter counts and the step times. At 1× both are the full model: RPS reproduces it
(same logits), so its accuracy matches and its step time shows the cost of materialising weights.
RPS saves memory, not FLOPs: at every compression it computes with the full-size model.

    .venv/bin/python bench/rps.py            # 8 trainings × 6 epochs: ~15 min on one CPU thread
    .venv/bin/python bench/rps.py --quick    # 1 epoch, for a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report  # noqa: E402

if TYPE_CHECKING:  # torch, transformers and memfit load in the functions: importing this file stays cheap
    import torch
    from transformers import BertConfig, BertForSequenceClassification

DATA = Path(__file__).resolve().parent.parent / "data"
PAD, UNK, CLS = 0, 1, 2
MAX_LEN = 24
FULL_HIDDEN = 128
COMPRESSIONS = [1.0, 1 / 4, 1 / 16, 1 / 64]


def load(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"debian-sections-{split}.jsonl").read_text().splitlines()]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def encode(rows: list[dict], vocab: dict[str, int], labels: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + word ids, padded to MAX_LEN; labels as indices."""
    import torch

    ids = torch.full((len(rows), MAX_LEN), PAD, dtype=torch.long)
    for r, row in enumerate(rows):
        toks = [CLS] + [vocab.get(w, UNK) for w in words(row["text"])][: MAX_LEN - 1]
        ids[r, : len(toks)] = torch.tensor(toks)
    return ids, torch.tensor([labels[row["label"]] for row in rows])


def bert_config(vocab_size: int, hidden: int, num_labels: int) -> BertConfig:
    from transformers import BertConfig

    heads = next(h for h in (4, 2, 1) if hidden % h == 0 and hidden // h >= 8) if hidden >= 8 else 1
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=MAX_LEN, type_vocab_size=1,
                      num_labels=num_labels, pad_token_id=PAD)


def count(config: BertConfig) -> int:
    import torch
    from transformers import BertForSequenceClassification

    with torch.device("meta"):
        return sum(p.numel() for p in BertForSequenceClassification(config).parameters())


def dense_hidden_for(budget: int, vocab_size: int, num_labels: int) -> int:
    """The largest hidden size whose dense model has at most `budget` parameters."""
    return max(h for h in range(1, FULL_HIDDEN + 1) if count(bert_config(vocab_size, h, num_labels)) <= budget)


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / classes


def train_eval(model: torch.nn.Module, train: tuple, val: tuple, args: argparse.Namespace, classes: int) -> dict:
    import torch
    import torch.nn.functional as F

    x, y = train
    steps = args.epochs * math.ceil(len(x) / args.batch)
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch):
            b = order[i:i + args.batch]
            logits = model(input_ids=x[b], attention_mask=(x[b] != PAD).long()).logits
            F.cross_entropy(logits, y[b]).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    model.eval()
    with torch.no_grad():
        vx, vy = val
        pred = torch.cat([model(input_ids=vx[i:i + 256], attention_mask=(vx[i:i + 256] != PAD).long()).logits
                          for i in range(0, len(vx), 256)]).argmax(-1)
    return {"accuracy": float((pred == vy).float().mean()), "macro_f1": macro_f1(pred, vy, classes),
            "step_ms": step_ms}


def build(config: BertConfig, seed: int) -> BertForSequenceClassification:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/rps.json alone (bench/readme_check.py compares the two)."""
    rows = []
    for res in payload["results"]:
        rps, dense = res["rps"], res["dense"]
        same = dense["params"] == payload["full_params"]
        rows.append([f"{round(1 / res['compression'])}×", f"{rps['params']:,}",
                     f"{rps['accuracy']:.3f} / {rps['macro_f1']:.3f}",
                     f"hidden {dense['hidden']} (the same model)" if same
                     else f"hidden {dense['hidden']}, {dense['params']:,} parameters",
                     f"{dense['accuracy']:.3f} / {dense['macro_f1']:.3f}"])
    header = ["compression", "RPS parameters", "RPS acc / F1", "dense model of equal size", "dense acc / F1"]
    return {"compression": md_table(header, "lrrlr", rows)}


def main() -> None:
    import torch

    import memfit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny matmuls are fastest on one thread")
    parser.add_argument("--quick", action="store_true", help="1 epoch, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    torch.set_num_threads(args.threads)

    train_rows, val_rows = load("train"), load("val")
    freq = collections.Counter(w for row in train_rows for w in words(row["text"]))
    vocab = {w: i + 3 for i, w in enumerate(sorted(w for w, c in freq.items() if c >= 2))}
    labels = {name: i for i, name in enumerate(sorted({row["label"] for row in train_rows}))}
    train, val = encode(train_rows, vocab, labels), encode(val_rows, vocab, labels)
    vocab_size, classes = len(vocab) + 3, len(labels)
    full = bert_config(vocab_size, FULL_HIDDEN, classes)
    majority = collections.Counter(val[1].tolist()).most_common(1)[0][1] / len(val[1])
    print(f"vocab {vocab_size}, {classes} classes, {len(train[1])} train / {len(val[1])} val rows, "
          f"full model {count(full):,} params, majority-class accuracy {majority:.3f}")

    rows, results = [], []
    for c in COMPRESSIONS:
        rps = memfit.compress(build(full, args.seed), memfit.RPSConfig(compression=c, seed=args.seed))
        params = memfit.trainable_parameters(rps)[1]
        footprint = memfit.rps_footprint(rps)
        r = train_eval(rps, train, val, args, classes)
        hidden = dense_hidden_for(params, vocab_size, classes)
        dense_cfg = bert_config(vocab_size, hidden, classes)
        d = train_eval(build(dense_cfg, args.seed), train, val, args, classes)
        result = {"compression": c, "rps": {**r, "params": params, **footprint},
                  "dense": {**d, "params": count(dense_cfg), "hidden": hidden}}
        results.append(result)
        rows.append([f"{round(1 / c)}×", params, r["accuracy"], r["macro_f1"], hidden, count(dense_cfg),
                     d["accuracy"], d["macro_f1"], r["step_ms"], d["step_ms"]])
        print(f"{round(1 / c)}×: rps acc {r['accuracy']:.3f} | dense(h={hidden}) acc {d['accuracy']:.3f}", flush=True)

    columns = ["compression", "RPS params", "RPS acc", "RPS F1", "dense hidden", "dense params", "dense acc",
               "dense F1", "RPS ms/step", "dense ms/step"]
    path = report("rps", "STABLE-RPS vs a smaller dense model of the same parameter count (Debian sections, "
                  "from scratch)", columns, rows, {"args": vars(args), "vocab_size": vocab_size,
                                                   "full_params": count(full), "majority_accuracy": majority,
                                                   "results": results})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
