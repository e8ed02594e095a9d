"""Many adapters in one batch: stacked low-rank slots and a per-row slot index (Punica's SGMV, S-LoRA, vLLM).

Every Linear an adapter may touch is wrapped once by `MultiLoraLinear`, which holds `slots` adapters as stacks
A [slots, r_max, in], B [slots, out, r_max] and a scale per slot (ranks padded with zeros to r_max: zeros change
nothing). One forward serves a batch whose rows use different adapters:

    y = x·W0ᵀ + b                                   (the base matmul, once for the whole batch)
    for i in rows: if slot(i) >= 0: y[i] += scale[slot(i)] · (x[i]·A[slot(i)]ᵀ)·B[slot(i)]ᵀ

The fast path is BGMV (Punica): each adapted row's A and B are gathered from the stacks and two batched matmuls
(shrink, then expand) serve every row at once, however many adapters the batch mixes; `reference_forward` is the
plain loop above, and a test holds one against the other.
The slot of each row lives in a `SlotRows` object shared by all wrapped layers of a model.

`lora_factors(directory, skeleton)` reads any LoRA-family adapter (LoRA, MoS from its pools, AdaLoRA, IncreLoRA,
or a PEFT LoRA folder) as plain (A, B, scale) per module, without touching the base weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from memfit.adapters.io import CONFIG_FILE, load_adapter, read_adapter_config
from memfit.adapters.model import adapter_modules, adapter_state_dict, inject
from memfit.adapters.peft_format import PEFT_WEIGHTS, load_peft_tensors, peft_config
from memfit.adapters.registry import config_from_dict, get_method
from memfit.adapters.targets import HEAD_NAMES
from memfit.errors import AdapterMismatchError, ConfigError
from memfit.quant import linear

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A [r, in], B [out, r], scale)


class SlotRows:
    """Which adapter slot each row of the current batch uses (-1: the base model alone)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # [B] slot per row
        self.active: torch.Tensor | None = None  # rows that use some adapter
        self.slots: torch.Tensor | None = None  # their slots

    def set(self, rows: list[int], device: torch.device | str = "cpu") -> None:
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        active = [i for i, s in enumerate(rows) if s >= 0]
        self.active = torch.tensor(active, dtype=torch.long, device=device) if active else None
        self.slots = self.rows[self.active] if active else None


class MultiLoraLinear(nn.Linear):
    """A Linear that adds each row's own adapter delta; the base keeps nn.Linear's `weight`/`bias` names."""

    def __init__(self, base: nn.Linear, slots: int, r_max: int, rows: SlotRows) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dtype, device = torch.float32, base.weight.device
        self.register_buffer("lora_A", torch.zeros(slots, r_max, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, self.out_features, r_max, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("scale", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        self.present = [False] * slots  # whether slot s adapts this module at all
        self._rows = (rows,)  # a tuple: the shared object is not a child module

    def set_slot(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        """Put one adapter's (A [r, in], B [out, r], scale) for this module into `slot`, or clear the slot."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scale[slot] = 0.0
        self.present[slot] = factors is not None
        if factors is None:
            return
        a, b, scale = factors
        r = a.shape[0]
        if r > self.lora_A.shape[1]:
            raise ConfigError(f"an adapter of rank {r} does not fit slots of rank {self.lora_A.shape[1]}; raise "
                              "--max-lora-rank.")
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b)
        self.scale[slot] = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BGMV: gather each adapted row's A and B, then two batched matmuls for all of them at once (a slot that
        does not adapt this module holds zeros, so its rows add nothing)."""
        y = linear(x, self.weight, self.bias)
        rows = self._rows[0]
        if rows.active is None or not any(self.present):
            return y
        h = x.index_select(0, rows.active).to(self.lora_A.dtype)  # [n, T, in]: the adapted rows
        a = self.lora_A.index_select(0, rows.slots)  # [n, r, in]
        b = self.lora_B.index_select(0, rows.slots)  # [n, out, r]
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # shrink [n, T, r], expand [n, T, out]
        delta = delta * self.scale.index_select(0, rows.slots)[:, None, None]
        return y.index_add(0, rows.active, delta.to(y.dtype))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain per-row loop the batched forward replaces (for tests)."""
        y = linear(x, self.weight, self.bias)
        rows = self._rows[0].rows
        out = []
        for i in range(x.shape[0]):
            s = int(rows[i])
            delta = 0.0
            if s >= 0 and self.present[s]:
                delta = self.scale[s] * (x[i] @ self.lora_A[s].T) @ self.lora_B[s].T
            out.append(y[i] + delta)
        return torch.stack(out)


def wrap_for_slots(model: nn.Module, slots: int, r_max: int,
                   modules: list[str] | None = None) -> tuple[SlotRows, dict[str, MultiLoraLinear]]:
    """Wrap every Linear of `model` (or the named `modules`; output heads excluded) for `slots` adapters."""
    rows = SlotRows()
    wrapped = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, MultiLoraLinear):
            continue
        if name.rpartition(".")[2] in HEAD_NAMES or (modules is not None and name not in modules):
            continue
        parent, _, child = name.rpartition(".")
        layer = MultiLoraLinear(module, slots, r_max, rows)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        wrapped[name] = layer
    rows.set([])
    return rows, wrapped


def _materialise(model: nn.Module) -> None:
    """Give the adapter's own tensors (made on the skeleton's meta device) real CPU memory to load into."""
    keys = set(adapter_state_dict(model))
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None and t.is_meta and prefix + attr in keys:
                    data = torch.empty(t.shape, dtype=t.dtype)
                    table[attr] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(
                        t, nn.Parameter) else data


def lora_factors(directory: str | os.PathLike, skeleton: nn.Module) -> Factors:
    """(A, B, scale) of every module of the adapter in `directory` (a memfit run or a PEFT LoRA folder).

    skeleton: the base model built on the meta device (`memfit.tiers.modules.empty_weights`); it is copied, so the
        same skeleton serves every adapter, and its (absent) weights are never read.
    """
    directory = Path(directory)
    model = copy.deepcopy(skeleton)
    peft = (directory / PEFT_WEIGHTS).is_file()
    if not peft and not (directory / CONFIG_FILE).is_file():
        raise AdapterMismatchError(f"{directory} holds no adapter (no {CONFIG_FILE}); pass a directory written by "
                                   "memfit finetune or PEFT's save_pretrained.")
    if peft:
        _load_peft(model, directory)
    else:
        inject(model, config_from_dict(read_adapter_config(directory)["config"]))
        method = get_method(model.memfit_config.method)
        _materialise(model)
        load_adapter(model, directory)
        if method.from_scratch:
            raise ConfigError(f"{directory} holds a model compressed from scratch ({method.name}), not an adapter.")
    layers = list(adapter_modules(model))
    if not layers or not all(hasattr(m, "lora_factors") for _, m in layers):
        raise ConfigError(f"{directory}: method {model.memfit_config.method!r} is not a B·A adapter, so it cannot "
                          "be served beside others in one batch; merge it (memfit merge) and serve the result.")
    extra = sorted(k for k in adapter_state_dict(model) if not any(k.startswith(n + ".") for n, _ in layers)
                   and not k.startswith("memfit_shared."))
    if extra:
        raise ConfigError(f"{directory} trains modules fully ({extra[:3]}, ...); a served adapter may only add "
                          "low-rank deltas. Merge it (memfit merge) and serve the result as its own model.")
    with torch.no_grad():
        return {name: tuple(t.detach().float().clone() if isinstance(t, torch.Tensor) else float(t)
                            for t in m.lora_factors()) for name, m in layers}


def _load_peft(model: nn.Module, directory: Path) -> None:
    inject(model, peft_config(directory))
    _materialise(model)
    load_peft_tensors(model, directory)
