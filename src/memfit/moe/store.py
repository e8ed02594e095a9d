"""Where every expert lies in the checkpoint, and how one is read into a cache slot.

A slot holds one expert in the in-memory fused layout, so the compute needs no copy:

    slot = [ gate (I x H) | up (I x H) | down (H x I) ]   ->   gate_up = slot[:2IH].view(2I, H)
                                                               down    = slot[2IH:].view(H, I)

Per-expert checkpoints (what Hugging Face checkpoints hold) give three tensors per expert, possibly in
three shards; fused checkpoints ([E, 2I, H] and [E, H, I]) give one contiguous slab per expert in each
tensor. Either way an expert is a few positional reads into its slot (through a small staging buffer when
the stored dtype differs from the compute dtype); tensors that lie back to back in a file (an expert's
three matrices, in per-expert checkpoints) are read as one span, one request instead of three.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memfit.errors import CheckpointError
from memfit.moe.arch import MoeArch
from memfit.tiers.st_reader import INDEX_NAME, SafetensorsReader, TensorInfo, read_index

ExpertKey = tuple[int, int]  # (decoder layer index, expert index)


@dataclass(frozen=True)
class _Part:
    info: TensorInfo  # the stored bytes (a whole tensor, or one expert's slab of a fused one)
    start: int  # first element in the slot


class ExpertStore:
    """Reads experts (layer, e) of `layers` ({index: module path}) from `reader` into slots of `dtype`."""

    def __init__(self, reader: SafetensorsReader, arch: MoeArch, layers: dict[int, str], num_experts: int,
                 hidden: int, intermediate: int, dtype: torch.dtype, checkpoint: str | Path) -> None:
        self.reader, self.arch, self.layers = reader, arch, layers
        self.num_experts, self.hidden, self.intermediate, self.dtype = num_experts, hidden, intermediate, dtype
        self._where = _key_files(Path(checkpoint))
        self._parts = {(l, e): self._locate(l, e) for l in layers for e in range(num_experts)}
        self._runs = {key: self._coalesce(parts) for key, parts in self._parts.items()}
        self._staging = threading.local()

    @property
    def expert_numel(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * len(self._parts)

    def keys(self) -> list[ExpertKey]:
        return list(self._parts)

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a filled slot."""
        H, I = self.hidden, self.intermediate
        return slot[: 2 * I * H].view(2 * I, H), slot[2 * I * H:].view(H, I)

    def fill(self, key: ExpertKey, out: torch.Tensor) -> int:
        """Read expert `key` into the 1-D slot `out`; returns the bytes read."""
        nbytes = 0
        for run in self._runs[key]:
            if run[0].info.dtype == self.dtype:
                dests = [out[p.start: p.start + p.info.nbytes // self.dtype.itemsize].view(torch.uint8) for p in run]
                self.reader.read_span([p.info for p in run], dests)
            else:  # one part, converted while copied into the slot
                part = run[0]
                staging = self._staging_buffer(part.info.nbytes)
                self.reader.read_into(part.info, staging)
                numel = part.info.nbytes // part.info.dtype.itemsize
                out[part.start: part.start + numel].copy_(staging.view(part.info.dtype))
            nbytes += sum(p.info.nbytes for p in run)
        return nbytes

    def _coalesce(self, parts: list[_Part]) -> list[list[_Part]]:
        """Parts that lie back to back in one file and need no conversion, as runs read in one request each."""
        runs: list[list[_Part]] = []
        for part in sorted(parts, key=lambda p: (str(p.info.path), p.info.offset)):
            last = runs[-1][-1].info if runs else None
            if (last is not None and part.info.dtype == self.dtype == last.dtype and part.info.path == last.path
                    and part.info.offset == last.offset + last.nbytes):
                runs[-1].append(part)
            else:
                runs.append([part])
        return runs

    def fingerprint(self) -> str:
        """A digest of the routing: model shape plus the stored bytes of every router. A predictor trained on
        traces of one model is only valid for a model with the same fingerprint."""
        h = hashlib.sha256(json.dumps([self.arch.model_type, sorted(self.layers), self.num_experts, self.hidden,
                                       self.intermediate]).encode())
        for layer in sorted(self.layers):
            key = self.find(f"{self.layers[layer]}.mlp.gate.weight")
            if key is None:
                raise CheckpointError(f"the checkpoint has no router weight for layer {layer} "
                                      f"({self.layers[layer]}.mlp.gate.weight); is it the checkpoint of this model?")
            h.update(self.reader.read(key).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def find(self, name: str) -> str | None:
        """The checkpoint key of the in-memory tensor `name`, or None."""
        return next((k for k in self.arch.disk_names(name) if k in self.reader), None)

    # -- locating -------------------------------------------------------------------------------------------
    def _locate(self, layer: int, e: int) -> list[_Part]:
        prefix = self.layers[layer]
        H, I = self.hidden, self.intermediate
        for keys in self.arch.expert_keys(prefix, e):
            if all(k in self.reader for k in keys):
                shapes = ((I, H), (I, H), (H, I))
                starts = (0, I * H, 2 * I * H)
                return [_Part(self._checked(k, s), start) for k, s, start in zip(keys, shapes, starts, strict=True)]
        gate_up, down = self.arch.fused_keys(prefix)
        if gate_up in self.reader and down in self.reader:
            E = self.num_experts
            return [_Part(self._slab(self._checked(gate_up, (E, 2 * I, H)), e), 0),
                    _Part(self._slab(self._checked(down, (E, H, I)), e), 2 * I * H)]
        wanted = self.arch.expert_keys(prefix, e)[0]
        missing = next(k for k in wanted if k not in self.reader)
        raise CheckpointError(f"expert {e} of layer {layer} is incomplete: tensor {missing!r} is not in "
                              f"{self._where(missing)} (nor a fused {gate_up!r}). The checkpoint is incomplete or "
                              "not of this model; copy it again.")

    def _checked(self, key: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.reader.info(key)
        if info.shape != shape or not info.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key!r} in {info.path} has shape {list(info.shape)} and dtype "
                                  f"{info.dtype}; the model's config expects shape {list(shape)} (floating point). "
                                  "config.json and the weights disagree.")
        return info

    @staticmethod
    def _slab(info: TensorInfo, e: int) -> TensorInfo:
        """Expert `e`'s contiguous slab of a fused [E, ...] tensor."""
        per = info.nbytes // info.shape[0]
        return replace(info, key=f"{info.key}[{e}]", offset=info.offset + e * per, nbytes=per, shape=info.shape[1:])

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def _key_files(root: Path) -> Callable[[str], str]:
    """key -> a description of the file that should hold it (the index's shard, or the checkpoint file). The index
    is read through `read_index`, so its shard names pass the same check as the reader's."""
    weight_map = read_index(root) if root.is_dir() and (root / INDEX_NAME).is_file() else {}

    def where(key: str) -> str:
        if key in weight_map:
            return str(weight_map[key])
        if weight_map:
            return f"{root / INDEX_NAME} (which does not list it)"
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        return ", ".join(str(f) for f in files)

    return where
