"""Where every expert lies in the checkpoint, and how one is read into a cache slot.

A slot holds one expert in the in-memory fused layout, so the compute needs no copy:

    slot = [ gate (I x H) | up (I x H) | down (H x I) ]   ->   gate_up = slot[:2IH].view(2I, H)
                                                               down    = slot[2IH:].view(H, I)

Per-expert checkpoints (what Hugging Face checkpoints hold) give three tensors per expert, possibly in
three shards; fused checkpoints ([E, 2I, H] and [E, H, I]) give one contiguous slab per expert in each
tensor. Quantized checkpoints (`memfit quantize`) give each expert's gate_up and down as codes and scales; the
slot is then bytes, each tensor at a 16-byte aligned offset, and `views` gives the two weights as
`memfit.quant.Parts` (dequantized tile by tile at compute), so the same budget holds 7.75x as many NF4 experts
as fp32 ones (measured by bench/quantize.py).
Either way an expert is a few positional reads into its slot (through a small staging buffer when
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
from memfit.quant.checkpoint import QUANT_FILE, empty_weight
from memfit.quant.linear import Parts
from memfit.tiers.st_reader import INDEX_NAME, SafetensorsReader, TensorInfo, read_index, serial_copy_

ExpertKey = tuple[int, int]  # (decoder layer index, expert index)


@dataclass(frozen=True)
class _Part:
    info: TensorInfo  # the stored bytes (a whole tensor, or one expert's slab of a fused one)
    start: int  # first element in the slot


@dataclass(frozen=True)
class _QuantTensor:
    proj: str  # "gate_up" or "down"
    name: str  # "codes", "absmax", ...
    dtype: torch.dtype
    shape: torch.Size
    offset: int  # byte offset in the slot

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class QuantLayout:
    """Where the tensors of one quantized expert lie in its byte slot, from a quantized checkpoint's record of a
    layer's experts ({"gate_up": weight record, "down": weight record})."""

    ALIGN = 16  # every tensor's offset, and the slot size: float views of the bytes need aligned storage

    def __init__(self, record: dict, name: str) -> None:
        self.weights = {proj: empty_weight(record[proj], f"{name}.{proj}_proj") for proj in ("gate_up", "down")}
        self.tensors, offset = [], 0
        for proj, w in self.weights.items():
            for part in w.part_names():
                t = getattr(w, part)
                self.tensors.append(_QuantTensor(proj, part, t.dtype, t.shape, offset))
                offset = -(-(offset + self.tensors[-1].nbytes) // self.ALIGN) * self.ALIGN
        self.nbytes = offset

    def same(self, other: QuantLayout) -> bool:
        return self.tensors == other.tensors and all(
            (a.kind, a.shape, a.block_size, a.dtype) == (b.kind, b.shape, b.block_size, b.dtype)
            for a, b in zip(self.weights.values(), other.weights.values(), strict=True))

    def views(self, slot: torch.Tensor) -> tuple[Parts, Parts]:
        tensors = {proj: [] for proj in self.weights}
        for t in self.tensors:
            tensors[t.proj].append(slot[t.offset: t.offset + t.nbytes].view(t.dtype).view(t.shape))
        return tuple(Parts(w.kind, w.shape, w.block_size, w.dtype, tuple(tensors[proj]))
                     for proj, w in self.weights.items())


class ExpertStore:
    """Reads experts (layer, e) of `layers` ({index: module path}) from `reader` into slots of `dtype`, or, given
    `quant` (a quantized checkpoint's records of its experts modules, by module path), into byte slots of
    quantized experts."""

    def __init__(self, reader: SafetensorsReader, arch: MoeArch, layers: dict[int, str], num_experts: int,
                 hidden: int, intermediate: int, dtype: torch.dtype, checkpoint: str | Path,
                 quant: dict[str, dict] | None = None) -> None:
        self.reader, self.arch, self.layers = reader, arch, layers
        self.num_experts, self.hidden, self.intermediate, self.dtype = num_experts, hidden, intermediate, dtype
        self.quant = self._quant_layout(quant) if quant else None
        self.slot_dtype = torch.uint8 if self.quant else dtype
        self._where = _key_files(Path(checkpoint))
        self._parts = {(l, e): self._locate(l, e) for l in layers for e in range(num_experts)}
        self._runs = {key: self._coalesce(parts) for key, parts in self._parts.items()}
        self._staging = threading.local()

    @property
    def expert_numel(self) -> int:
        """Elements of slot_dtype in one expert's slot."""
        return self.quant.nbytes if self.quant else 3 * self.hidden * self.intermediate

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * self.slot_dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * len(self._parts)

    @property
    def num_parameters(self) -> int:
        """Weights of all experts (gate, up and down of each), however they are stored."""
        return 3 * self.hidden * self.intermediate * len(self._parts)

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging buffer each reading thread keeps for parts converted to the compute dtype as they
        are read (0 when every part is stored in it)."""
        return max((p.info.nbytes for parts in self._parts.values() for p in parts if not self._raw(p.info)),
                   default=0)

    @property
    def span_bytes(self) -> int:
        """Bytes of the longest single read `fill` makes (a run of parts that lie back to back)."""
        return max(sum(p.info.nbytes for p in run) for runs in self._runs.values() for run in runs)

    def keys(self) -> list[ExpertKey]:
        return list(self._parts)

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[Parts, Parts]:
        """(gate_up [2I, H], down [H, I]) views of a filled slot (quantized weights' parts, for a quantized one)."""
        if self.quant:
            return self.quant.views(slot)
        H, I = self.hidden, self.intermediate
        return slot[: 2 * I * H].view(2 * I, H), slot[2 * I * H:].view(H, I)

    def fill(self, key: ExpertKey, out: torch.Tensor) -> int:
        """Read expert `key` into the 1-D slot `out`; returns the bytes read."""
        nbytes = 0
        for run in self._runs[key]:
            if self._raw(run[0].info):
                dests = [out[p.start: p.start + p.info.nbytes // self.slot_dtype.itemsize].view(torch.uint8)
                         for p in run]
                self.reader.read_span([p.info for p in run], dests)
            else:  # one part, converted while copied into the slot
                part = run[0]
                staging = self._staging_buffer(part.info.nbytes)
                self.reader.read_into(part.info, staging)
                numel = part.info.nbytes // part.info.dtype.itemsize
                serial_copy_(out[part.start: part.start + numel], staging.view(part.info.dtype))
            nbytes += sum(p.info.nbytes for p in run)
        return nbytes

    def _coalesce(self, parts: list[_Part]) -> list[list[_Part]]:
        """Parts that lie back to back in one file and need no conversion, as runs read in one request each."""
        runs: list[list[_Part]] = []
        for part in sorted(parts, key=lambda p: (str(p.info.path), p.info.offset)):
            last = runs[-1][-1].info if runs else None
            if (last is not None and self._raw(part.info) and self._raw(last) and part.info.path == last.path
                    and part.info.offset == last.offset + last.nbytes):
                runs[-1].append(part)
            else:
                runs.append([part])
        return runs

    def _raw(self, info: TensorInfo) -> bool:
        """Whether the stored bytes go into the slot as they are (quantized tensors always do)."""
        return self.quant is not None or info.dtype == self.dtype

    def _quant_layout(self, records: dict[str, dict]) -> QuantLayout:
        """The one slot layout of every MoE layer's quantized experts (they all have the same shapes)."""
        layouts = []
        for layer, prefix in sorted(self.layers.items()):
            name = f"{prefix}.mlp.experts"
            if name not in records:
                raise CheckpointError(f"the quantized checkpoint's {QUANT_FILE} has no record of {name} although "
                                      "other layers' experts are quantized; quantize the model again.")
            layouts.append(QuantLayout(records[name], name))
            if not layouts[0].same(layouts[-1]):
                raise CheckpointError(f"{name} (layer {layer}) is quantized unlike the first MoE layer's experts; "
                                      "offloaded experts share one slot layout: quantize every layer alike.")
        return layouts[0]

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
        if self.quant:
            return [_Part(self._checked_quant(f"{prefix}.mlp.experts.{t.proj}_proj.{e}.{t.name}", t), t.offset)
                    for t in self.quant.tensors]
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

    def _checked_quant(self, key: str, want: _QuantTensor) -> TensorInfo:
        if key not in self.reader:
            raise CheckpointError(f"the quantized checkpoint lacks {key!r} ({self._where(key)}); it is incomplete: "
                                  "quantize the model again.")
        info = self.reader.info(key)
        if info.dtype != want.dtype or info.nbytes != want.nbytes:
            raise CheckpointError(f"tensor {key!r} in {info.path} is {info.dtype} of {info.nbytes} bytes, but "
                                  f"{QUANT_FILE} makes it {want.dtype} of {want.nbytes} bytes; the checkpoint does not "
                                  "match its config (quantize the model again).")
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
