"""Routing traces: which experts every MoE layer chose for every token of a text, for training predictors.

A trace holds, per token, the residual stream entering the first MoE layer (the routing-path predictor's
input, float16) and the top-k experts of every MoE layer. It is tied to one model by its fingerprint.
Files are safetensors with JSON metadata, written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memfit.errors import CheckpointError, DataError
from memfit.tiers.files import load_tensors, save_tensors

FORMAT = "memfit-moe-trace-1"


@dataclass
class Trace:
    features: torch.Tensor  # [N, H] float16: the residual stream entering the first MoE layer
    routes: torch.Tensor  # [N, L, k] int16: experts chosen by each MoE layer
    layers: list[int]  # the MoE layers, in order
    num_experts: int
    fingerprint: str  # the model's (memfit.moe.store.ExpertStore.fingerprint)

    @property
    def tokens(self) -> int:
        return self.routes.shape[0]

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"format": FORMAT, "layers": json.dumps(self.layers), "num_experts": str(self.num_experts),
                "fingerprint": self.fingerprint}
        return save_tensors(path, {"features": self.features, "routes": self.routes}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        from safetensors import safe_open

        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or set(tensors) != {"features", "routes"}:
            raise CheckpointError(f"{path} is not a memfit routing trace; record one with `memfit moe trace`.")
        return cls(tensors["features"], tensors["routes"], json.loads(meta["layers"]), int(meta["num_experts"]),
                   meta["fingerprint"])


def read_texts(path: str | os.PathLike, fields: tuple[str, ...] = ("text",)) -> list[str]:
    """Texts of a .jsonl file (one JSON object per line, the text under the first of `fields` it has) or of
    a plain text file (one text per non-empty line)."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise DataError(f"no text file at {path}.")
    numbered = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        texts = [line for _, line in numbered]
    else:
        texts = []
        for n, line in numbered:  # n: the line in the file, blank lines counted
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e}).") from e
            field = next((f for f in fields if isinstance(obj, dict) and isinstance(obj.get(f), str)), None)
            if field is None:
                raise DataError(f"{path}:{n} has no string field {' or '.join(map(repr, fields))}; each line must "
                                f'look like {{"{fields[0]}": "..."}}.')
            texts.append(obj[field])
    if not texts:
        raise DataError(f"{path} holds no text.")
    return texts


def token_windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """The texts tokenized, joined by EOS and cut into [n, seq_len] windows (the remainder is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; give more text or "
                        "a shorter --seq-len.")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i: i + batch_size]


@torch.no_grad()
def record(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress=None) -> Trace:
    """Run an offloaded model (memfit.moe.load) over token windows [n, T] and record its routing."""
    runtime = model.memfit_moe
    layers = runtime.order
    features: list[torch.Tensor] = []
    routes: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    hooks = [getattr(runtime.layers[layers[0]], runtime.arch.norm).register_forward_pre_hook(
        lambda m, args: features.append(args[0].reshape(-1, args[0].shape[-1]).half()))]
    for l in layers:
        hooks.append(runtime.layers[l].mlp.gate.register_forward_hook(
            lambda m, args, out, l=l: routes[l].append(out[2].reshape(out[2].shape[0], -1).to(torch.int16))))
    try:
        for batch in _batches(windows, batch_size):
            model(input_ids=batch, use_cache=False)
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for h in hooks:
            h.remove()
    per_layer = [torch.cat(routes[l]) for l in layers]
    return Trace(torch.cat(features), torch.stack(per_layer, dim=1), layers, runtime.num_experts,
                 runtime.fingerprint)
