"""A streamed model's vocabulary tensors, read from disk on demand: embedding rows per lookup, the output head in
vocabulary chunks.

A 256k-token vocabulary at hidden 1024 is 1 GB of fp32 embedding (and as much again for an untied head), which
weight streaming would otherwise keep resident beside two decoder layers. Here the input embedding's weight is a
0-element placeholder; a lookup reads only the rows of its tokens (one read per run of consecutive ids) into a
small [unique tokens, hidden] matrix and runs the embedding's own forward on it with the ids renumbered, so
subclasses that scale their output keep doing so. The head's weight is a placeholder too; `head_chunks(rows)`
reads it `rows` vocabulary rows at a time, which the chunked cross-entropy (`memfit.train.loss`) consumes with an
online log-sum-exp, and the head's forward (generation, evaluation) builds the logits chunk by chunk. A tied head
reads the embedding's tensor. Both weights stay frozen: streaming serves frozen base weights only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError
from memfit.tiers.st_reader import SafetensorsReader, TensorInfo

HEAD_CHUNK_BYTES = 16 * 2**20  # bytes of head weight read at once by the head's own forward


class VocabStream:
    """Streams `embedding` (an nn.Embedding) and/or `head` (a plain nn.Linear) of a model from `reader`, by the
    checkpoint keys given; `count(nbytes)` is told of every read (the owning stream sets it to its disk counter)."""

    def __init__(self, reader: SafetensorsReader, embedding: nn.Embedding | None, embedding_key: str | None,
                 head: nn.Linear | None, head_key: str | None, device: torch.device,
                 count: Callable[[int], None] = lambda nbytes: None) -> None:
        self.reader, self.device, self.count = reader, device, count
        self.embedding, self.head = embedding, head
        self._infos: dict[str, TensorInfo] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._keys = {}
        for name, module, key in (("embedding", embedding, embedding_key), ("head", head, head_key)):
            if module is None:
                continue
            info = reader.info(key)
            if tuple(info.shape) != tuple(module.weight.shape):
                raise ConfigError(f"the checkpoint's {key} is {list(info.shape)}, but the model's {name} weight is "
                                  f"{list(module.weight.shape)}; config.json and the weights disagree.")
            self._keys[name], self._infos[name], self._dtypes[name] = key, info, module.weight.dtype
        self.tied = embedding is not None and head is not None and embedding_key == head_key

    @property
    def nbytes(self) -> int:
        """Bytes of vocabulary weights that live on disk (a tied weight counted once)."""
        per_key = {self._keys[n]: i.shape[0] * i.shape[1] * self._dtypes[n].itemsize for n, i in self._infos.items()}
        return sum(per_key.values())

    # -- reads ------------------------------------------------------------------------------------
    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        info = self._infos[name]
        row = info.nbytes // info.shape[0]
        part = replace(info, offset=info.offset + r0 * row, nbytes=(r1 - r0) * row, shape=(r1 - r0, info.shape[1]))
        buf = torch.empty(part.nbytes, dtype=torch.uint8)
        self.reader.read_into(part, buf)
        self.count(part.nbytes)
        return buf.view(info.dtype).view(part.shape).to(self.device, self._dtypes[name])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of the sorted unique token ids `ids` (1-D), [len(ids), hidden]: one read per run of
        consecutive ids."""
        vocab = self._infos["embedding"].shape[0]
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= vocab):
            raise ConfigError(f"token id {int(ids[-1]) if int(ids[-1]) >= vocab else int(ids[0])} is outside the "
                              f"embedding's {vocab} rows; the data was tokenized for another model.")
        parts = [self._read_rows("embedding", r0, r1) for _, r0, r1 in consecutive_runs(ids.tolist())]
        if not parts:
            return torch.empty(0, self._infos["embedding"].shape[1], dtype=self._dtypes["embedding"],
                               device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def head_chunks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first row, end row, weight rows [r, hidden]) over the head's vocabulary, `rows` at a time."""
        _frozen(self.head, "output head")
        vocab = self._infos["head"].shape[0]
        for v0 in range(0, vocab, rows):
            yield v0, min(vocab, v0 + rows), self._read_rows("head", v0, min(vocab, v0 + rows))

    def head_vocab(self) -> int:
        """Rows of the streamed head: its vocabulary size."""
        return self._infos["head"].shape[0]

    def head_rows(self) -> int:
        """Vocabulary rows per chunk for the head's own forward."""
        info = self._infos["head"]
        return max(1, HEAD_CHUNK_BYTES // (info.nbytes // info.shape[0]))

    def read_all(self, name: str) -> torch.Tensor:
        return self._read_rows(name, 0, self._infos[name].shape[0])

    # -- installing -------------------------------------------------------------------------------
    def install(self) -> None:
        """Swap the weights for placeholders and the forwards for streamed ones."""
        if self.embedding is not None:
            _placeholder(self.embedding, self.device)
            inner = self.embedding.forward
            self.embedding.forward = lambda input_ids: self._embed(inner, input_ids)
        if self.head is not None:
            _placeholder(self.head, self.device)
            self.head.forward = self._head_forward
            self.head.memfit_vocab = self  # the chunked loss reads the head through it

    def _embed(self, inner, input_ids: torch.Tensor) -> torch.Tensor:
        _frozen(self.embedding, "input embedding")
        unique, inverse = torch.unique(input_ids, sorted=True, return_inverse=True)
        emb, padding = self.embedding, self.embedding.padding_idx
        emb._parameters["weight"] = nn.Parameter(self.rows(unique.cpu()), requires_grad=False)
        emb.padding_idx = None  # it only shapes the weight's gradient (frozen here) and indexes the full table
        try:
            return inner(inverse.view_as(input_ids))
        finally:
            emb.padding_idx = padding
            _placeholder(emb, self.device)

    def _head_forward(self, x: torch.Tensor) -> torch.Tensor:
        _frozen(self.head, "output head")
        bias = self.head.bias
        out = x.new_empty(*x.shape[:-1], self._infos["head"].shape[0])
        for v0, v1, w in self.head_chunks(self.head_rows()):
            out[..., v0:v1] = F.linear(x, w, None if bias is None else bias[v0:v1])
        return out

    def close(self, materialize: bool) -> None:
        """Restore the modules' own forwards and (materialize=True) their whole weights, tied again if they were."""
        weights = {}
        for name in ("embedding", "head"):
            module = getattr(self, name)
            if module is None:
                continue
            module.__dict__.pop("forward", None)
            module.__dict__.pop("memfit_vocab", None)
            if materialize:
                key = self._keys[name]
                if key not in weights:
                    weights[key] = nn.Parameter(self.read_all(name), requires_grad=False)
                module._parameters["weight"] = weights[key]


def consecutive_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in `ids`, first id, end id) of each run of consecutive values in the sorted `ids`."""
    if not ids:
        return []
    starts = [0] + [k for k in range(1, len(ids)) if ids[k] != ids[k - 1] + 1]
    return [(a, ids[a], ids[b - 1] + 1) for a, b in zip(starts, [*starts[1:], len(ids)], strict=True)]


def _placeholder(module: nn.Module, device: torch.device) -> None:
    dtype = module._parameters["weight"].dtype
    module._parameters["weight"] = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)


def _frozen(module: nn.Module, what: str) -> None:
    if module._parameters["weight"].requires_grad:
        raise ConfigError(f"the {what} is streamed from disk (--weights-budget) and cannot be trained; train "
                          "adapters on a streamed base, or fine-tune it without --weights-budget.")


def streamable(embedding: nn.Module | None, head: nn.Module | None) -> tuple[nn.Embedding | None, nn.Linear | None]:
    """Which of the two can be streamed: an nn.Embedding without max_norm (which renormalizes the stored table in
    place) and a plain nn.Linear head; another module (an adapter around the head) stays resident."""
    ok_embedding = isinstance(embedding, nn.Embedding) and embedding.max_norm is None
    return (embedding if ok_embedding else None), (head if type(head) is nn.Linear else None)
