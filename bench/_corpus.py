"""Real text on this disk for the benchmark models: Python standard-library docstrings and Debian synopses.

Shared by bench/make_moe.py (the MoE model of bench/moe.py) and bench/make_lm.py (the base model of the
causal-LM task of bench/quality.py): deterministic gathering, splitting, a byte-level BPE tokenizer and
seeded random training windows.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of this interpreter's standard library (modules, classes, functions), whitespace-normalised."""
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    texts = []
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if "test" in path.parent.name or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(" ".join(doc.split()))
    return texts


def debian_descriptions() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data").glob("debian-sections-*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return texts


def split(texts: list[str], heldout: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic split by a hash of each text (the same text always lands on the same side)."""
    train, test = [], []
    for t in dict.fromkeys(texts):
        bucket = int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) / 16**8
        (test if bucket < heldout else train).append(t)
    return train, test


def train_tokenizer(texts: list[str], vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def batches(ids: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    """`steps` batches of random windows [batch, seq + 1] from the token stream (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s: s + seq + 1] for s in starts.tolist()])


def warmup_cosine(steps: int, floor: float = 0.1):
    """LR factor per step: linear warmup over 5% of the steps, then cosine decay to `floor`."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """All texts tokenised and joined, each followed by the end-of-text token."""
    stream = []
    for t in texts:
        stream += tok(t)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(stream)


def pretrain_args(doc: str, out: Path, presets: dict[str, dict]) -> tuple[argparse.Namespace, dict]:
    """The command line of a pretraining script: (arguments, the chosen preset with --steps applied); seeds
    torch and sets its threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--preset", choices=sorted(presets), default="default")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    preset = dict(presets[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args, preset
