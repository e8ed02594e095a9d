"""The debian-sections question for a chat LLM, shared by the benchmarks that ask it (zo.py, quality_llm.py).

The shipped synopses (data/debian-sections-*.jsonl) become prompts "Which Debian archive section is this package
in? Package: <synopsis>", raw or in the model's chat template with the 14 sections listed, and the section is the
completion; a greedy answer is scored by exact match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUESTION = "Which Debian archive section is this package in? Package: {}"


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SECTIONS = ["admin", "database", "editors", "fonts", "games", "graphics", "mail", "math", "net", "science",
            "sound", "text", "video", "web"]
SYSTEM = "Answer with one word: the Debian archive section of the package."
STYLES = ("plain", "chat", "chat-brief")


def prompt(text: str, style: str, tokenizer) -> str:
    """The question as a raw completion prompt ("plain"), or in the model's chat template with the 14 sections
    listed in the system message ("chat") or not ("chat-brief": 30 fewer tokens, which a fine-tune learns)."""
    if style == "plain":
        return QUESTION.format(text)
    system = SYSTEM if style == "chat-brief" else SYSTEM[:-1] + ", one of: " + ", ".join(SECTIONS) + "."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION.format(text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def exact_match(model, tokenizer, val: Path, batch: int = 25) -> float:
    """Share of validation prompts whose greedy answer (up to 6 tokens, first line) is exactly the section."""
    hits = answered(model, tokenizer, val, batch)
    return hits.count("1") / len(hits)


def answered(model, tokenizer, val: Path, batch: int = 25) -> str:
    """Per validation prompt, "1" where the greedy answer (up to 6 tokens, first line) is exactly the section,
    else "0": kept per run, so two rows can be compared on the same prompts (paired), not only by their means."""
    import torch

    rows = jsonl_rows(val)
    tokenizer.padding_side = "left"
    hits = []
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        enc = tokenizer([r["prompt"] for r in part], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for r, ids in zip(part, out[:, enc["input_ids"].shape[1]:], strict=True):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip().splitlines()
            hits.append("1" if answer and answer[0].strip() == r["completion"] else "0")
    return "".join(hits)


LIST_SYSTEM = "You write Debian package synopses, one line per package."
LIST_QUESTION = "List packages of the Debian archive's {} section."


def synopsis_lists(rows: list[dict], tokenizer, per_answer: int = 5) -> list[dict]:
    """The synopses as long chat answers: per section, its packages in file order, `per_answer` synopses (one per
    line) to an answer (the last of a section may hold fewer), as prompt/completion rows in a fixed shuffled order.
    Most tokens of such a row are targets (~52 of ~91), where a section answer has one or two: a task on which how
    much an adapter can learn (its capacity) shows, not only whether it finds the label."""
    by_section: dict[str, list[str]] = {}
    for r in rows:
        by_section.setdefault(r["label"], []).append(r["text"])
    out = []
    for section, texts in by_section.items():
        messages = [{"role": "system", "content": LIST_SYSTEM},
                    {"role": "user", "content": LIST_QUESTION.format(section)}]
        question = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out += [{"prompt": question, "completion": "\n".join(texts[s:s + per_answer])}
                for s in range(0, len(texts), per_answer)]
    random.Random(0).shuffle(out)
    return out
