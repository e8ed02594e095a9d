"""Live bytes of one training step, traced on fake tensors: every tensor the step creates, and when it dies.

A `TorchDispatchMode` sees each op's outputs; a storage the step did not hold before is counted from its first
output until its Python storage object is collected (storages keep their Python object while C++ still holds them,
so a tensor autograd saved stays counted until the backward frees it). On fake (or meta) tensors no byte is
allocated and no weight is read, so a step of any model costs about one CPU forward of shape propagation. A fake
tensor has no values, so the few questions code asks of them (`.item()`, `allclose`, `nonzero`) get the answers
below.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# A fake tensor's storage reports a data pointer of 0, and torch warns when one is read: harmless here.
warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")


class LiveBytes(TorchDispatchMode):
    """Current and peak bytes of the storages created under this mode; `held` storages (weights) are not counted."""

    def __init__(self, held: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._held = {t.untyped_storage()._cdata for t in held}
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def mark(self) -> int:
        """The current bytes, and the peak restarted from them (to measure a phase on its own)."""
        self.peak = self.current
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        meta = any(isinstance(a, FakeTensor) or (isinstance(a, torch.Tensor) and a.is_meta) for a in args)
        if meta and func is torch.ops.aten._local_scalar_dense.default:
            # A fake tensor has no value. A flag ("any NaN?", "is every mask entry set?") answers no; a number (a
            # step count) answers 1, which no divisor or size chokes on.
            return False if args[0].dtype == torch.bool else 1
        if meta and func in (torch.ops.aten.allclose.default, torch.ops.aten.equal.default):
            return True  # e.g. "are the logits head(decoder(x))?": the architectures memfit plans answer yes
        if meta and func is torch.ops.aten.nonzero.default:  # the loss's target positions: every one of them
            t = args[0]
            out = torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        elif meta and func is torch.ops.aten._grouped_mm.default and _grouped_mm_shape(*args) is not None:
            # transformers' MoE experts (tokens sorted by expert, one grouped matmul): the CPU runs it in fp32,
            # while its meta kernel accepts bf16 only. Its output has the shapes' size whatever the routing.
            a = args[0]
            out = torch.empty(_grouped_mm_shape(*args), dtype=(kwargs or {}).get("out_dtype") or a.dtype,
                              device=a.device)
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._held or key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def _grouped_mm_shape(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                      *rest) -> tuple[int, ...] | None:
    """The shape of `torch._grouped_mm(a, b, offs)`'s output: [M, N] for 2-D a and 3-D b (groups of rows), [G, M, N]
    for 3-D a and b and for 2-D a and b (groups along K), [M, N] for 3-D a and 2-D b; None for operands the op
    refuses (the op itself then raises its own error)."""
    if a.dim() == 2 and b.dim() == 3:
        return (a.shape[0], b.shape[-1])
    if a.dim() == 3 and b.dim() == 3:
        return (a.shape[0], a.shape[1], b.shape[-1])
    if a.dim() == 2 and b.dim() == 2 and offs is not None:
        return (offs.shape[0], a.shape[0], b.shape[-1])
    if a.dim() == 3 and b.dim() == 2:
        return (a.shape[1], b.shape[-1])
    return None
