"""AdamW with block-wise 8-bit m and v (≈2.03 bytes of state per parameter instead of 8).

Per parameter of at least `min_8bit_size` values the state is: `exp_avg_q` / `exp_avg_sq_q` (uint8, one code
per value, signed / unsigned dynamic map) and `exp_avg_absmax` / `exp_avg_sq_absmax` (fp32, one per block
of 256). Each step dequantises a block, runs the AdamW update in fp32, then requantises with the block's new
absmax. Smaller tensors (biases, norms) keep fp32 `exp_avg` / `exp_avg_sq` like torch.optim.AdamW: they are
a rounding error of the memory and the most sensitive to quantisation; they step together, one foreach Adam call
per group (bitwise torch's single-tensor AdamW).

On CPU the update is one fused pass (`memfit.optim.kernels`); on CUDA, or without a C compiler, the same
maths runs as torch ops in chunks of `chunk_size` values so temporaries stay small, compiled by torch.compile
on accelerators (a few fused kernels per chunk, no host sync).

FSDP2 (DTensor) parameters are updated through their local shards. So that the states shard like the
parameters (and a checkpoint holds each rank's own part, as memfit.train.distributed writes it), blocks then run
along rows (dim 0, the dimension FSDP2 shards) and `state_dict()` returns the codes and absmax as DTensors with
the parameter's placements: codes [*param shape], absmax [rows, ceil(row / 256)]. A 1-D sharded parameter, or
one sharded on another dim, keeps fp32 states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

import torch
from torch.optim.adam import adam

from memfit.errors import ConfigError
from memfit.optim import kernels
from memfit.optim.quant import BLOCK, QuantTables, block_ids, blocks_per_row, quantize, quantize_normalized, tables

Q_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _row_length(p: torch.Tensor) -> int | None:
    """Values per row that blocks must not cross: numel for a plain tensor, the local row for a DTensor sharded
    on dim 0 only; None when blocks cannot follow the sharding (fp32 states then)."""
    if not hasattr(p, "to_local"):
        return p.numel()
    sharded_dims = {pl.dim for pl in p.placements if pl.is_shard()}
    if p.dim() < 2 or not sharded_dims <= {0}:
        return None
    return math.prod(p.shape[1:])


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW with 8-bit block-wise states; same hyperparameters and defaults."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096,
                 chunk_size: int = 1 << 20) -> None:
        if lr < 0.0:
            raise ConfigError(f"lr must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas must lie in [0, 1), got {betas}.")
        if chunk_size % BLOCK:
            raise ConfigError(f"chunk_size must be a multiple of {BLOCK}, got {chunk_size}.")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.chunk_size = chunk_size

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        w, row = local(p), _row_length(p)
        n, dev = w.numel(), w.device
        state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0)}
        if p.numel() < self.min_8bit_size or row is None:
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            return state
        state.update(zero_states(n, (n // row) * blocks_per_row(row) if row else 0, dev))
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The updates run together at the end: the 8-bit ones in one kernel call on CPU, the fp32 ones (small
        # tensors) in one foreach call per group. Distinct parameters must not share memory (they may run at once
        # on different threads); one listed twice is run in turn.
        batch = _Batch(self.chunk_size)
        pending: set[int] = set()
        hypers: dict[tuple[int, float], torch.Tensor] = {}  # one constants tensor per group and step count
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise ConfigError("AdamW8bit does not support sparse gradients; use dense embeddings.")
                    if id(p) in pending:  # listed twice: its first update must land before the second reads it
                        batch.run()
                        pending.clear()
                    self._update(p, group, hypers, batch)
                    pending.add(id(p))
        finally:  # also when a later parameter is refused: those before it were counted, so they are applied
            batch.run()
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], hypers: dict[tuple[int, float], torch.Tensor],
                batch: _Batch) -> None:
        """Add the parameter's update to the batch and count its step (torch's adam counts the fp32 ones)."""
        if not self.state.get(p):
            self.state[p] = self._init_state(p)
        state = self.state[p]
        w, g = local(p), local(p.grad)
        if "exp_avg" in state:
            batch.add_fp32(group, w, g, state)
            return
        state["step"] += 1
        if w.numel() == 0:
            return
        if w.dtype != torch.float32 or g.dtype != torch.float32 or not w.is_contiguous():
            raise ConfigError(f"AdamW8bit needs contiguous fp32 parameters and gradients, got {w.dtype}/{g.dtype}. "
                              "Keep trainable weights in fp32 (master weights) and cast in the forward.")
        step = state["step"].item()
        hp = hypers.get((id(group), step))
        if hp is None:
            hp = hypers[id(group), step] = _hyper(group, step)
        batch.updates.append((w.view(-1), g.contiguous().view(-1), *(state[k] for k in Q_KEYS), hp, _row_length(p)))

    def state_dict(self) -> dict[str, Any]:
        """torch's, with the states of DTensor parameters as DTensors laid out like the parameter."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in sd["state"].items():
            p = params[i]
            if hasattr(p, "to_local"):
                sd["state"][i] = {k: v if k == "step" else _as_dtensor(v, p, k) for k, v in s.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but 8-bit codes and fp32 states keep their dtype (torch would cast them to the param's)
        and DTensor states become the flat local tensors the update works on."""
        states = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        for key, s in states.items():
            p = params[int(key)]
            dev = local(p).device
            self.state[p] = {k: v.clone() if k == "step" else _from_saved(v, k, dev) for k, v in s.items()}


class _Batch:
    """The updates of one step, run together: 8-bit ones by `step_8bit_many`, fp32 ones by torch's foreach Adam
    per group (bitwise its single-tensor loop, without ~40 µs of Python per small tensor)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.updates: list[kernels.Update] = []
        self.fp32: dict[int, tuple[dict[str, Any], list[list[torch.Tensor]]]] = {}  # id(group) -> group, w/g/m/v/step

    def add_fp32(self, group: dict[str, Any], w: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        lists = self.fp32.setdefault(id(group), (group, [[], [], [], [], []]))[1]
        for target, t in zip(lists, (w, g, state["exp_avg"], state["exp_avg_sq"], state["step"]), strict=True):
            target.append(t)  # torch's adam adds 1 to the step count in place before it uses it

    def run(self) -> None:
        updates, fp32 = self.updates, self.fp32
        self.updates, self.fp32 = [], {}
        step_8bit_many(updates, self.chunk_size)
        for group, (w, g, m, v, steps) in fp32.values():
            beta1, beta2 = group["betas"]
            adam(w, g, m, v, [], steps, foreach=True, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                 beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def zero_states(n: int, blocks: int, device: torch.device) -> dict[str, torch.Tensor]:
    """8-bit m and v of n values in `blocks` blocks, all zero (m's zero is a code in the middle of its map)."""
    zero_m = quantize_normalized(torch.zeros(1, device=device), tables(True, device)).item()
    return {"exp_avg_q": torch.full((n,), zero_m, dtype=torch.uint8, device=device),
            "exp_avg_absmax": torch.zeros(blocks, device=device),
            "exp_avg_sq_q": torch.zeros(n, dtype=torch.uint8, device=device),  # code 0 is the value 0
            "exp_avg_sq_absmax": torch.zeros(blocks, device=device)}


def step_8bit(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ma: torch.Tensor, vq: torch.Tensor,
              va: torch.Tensor, hp: torch.Tensor, row: int, chunk_size: int = 1 << 20) -> None:
    """One update of flat fp32 p with gradient g and 8-bit states (codes mq, vq; absmax ma, va; blocks along rows
    of `row` values): p = p * hp[3] + hp[4] * m / (sqrt(v) * hp[5] + hp[6]). The fused CPU kernel where it is
    built; elsewhere the same maths as torch ops in chunks of whole blocks, compiled into fused kernels on
    accelerators (`chunk_update`). `hp` is a CPU tensor; nothing here waits for the device."""
    step_8bit_many([(p, g, mq, ma, vq, va, hp, row)], chunk_size)


def step_8bit_many(updates: list[kernels.Update], chunk_size: int = 1 << 20) -> None:
    """`step_8bit` of many tensors: those on the CPU in one kernel call where it is built (their blocks split over
    the threads together), the others one by one."""
    kernel = kernels.load() is not None
    fused, other = [], []
    for update in updates:
        (fused if kernel and update[0].device.type == "cpu" else other).append(update)
    if fused:
        kernels.adamw8bit_steps(fused, tables(True), tables(False))
    for update in other:
        _step_torch(*update, chunk_size)


def _step_torch(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ma: torch.Tensor, vq: torch.Tensor,
                va: torch.Tensor, hp: torch.Tensor, row: int, chunk_size: int) -> None:
    """`step_8bit` as torch ops on any device."""
    tm, tv = tables(True, p.device), tables(False, p.device)
    update = chunk_update(p.device.type != "cpu")
    if p.device.type != "cpu":  # pinned, so the copy is queued behind the step's kernels, not waited for
        hp = hp.pin_memory().to(p.device, non_blocking=True) if p.device.type == "cuda" else hp.to(p.device)
    # Chunks start on block boundaries: multiples of 256 within one flat run, or whole rows.
    unit = BLOCK if row % BLOCK == 0 or row == p.numel() else row
    step = max(1, chunk_size // unit) * unit
    for s in range(0, p.numel(), step):
        e = min(s + step, p.numel())
        b0, b1 = _block_of(s, row), _block_of(e - 1, row) + 1  # host arithmetic: no device sync per chunk
        update(p[s:e], g[s:e], mq[s:e], ma[b0:b1], vq[s:e], va[b0:b1], hp, tm, tv,
               block_ids(s, e, row, p.device) - b0)


@cache
def chunk_update(compiled: bool) -> Callable[..., None]:
    """`update_chunk`, or it compiled by torch.compile (the accelerator path: its ~25 elementwise passes, the
    block maxima and the table lookups fused into a few kernels, for any chunk length)."""
    return torch.compile(update_chunk, dynamic=True) if compiled else update_chunk


def _block_of(i: int, row: int) -> int:
    return (i // row) * blocks_per_row(row) + (i % row) // BLOCK


def _as_dtensor(v: torch.Tensor, p: torch.Tensor, key: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    w = local(p)
    if key.endswith("_absmax"):  # [rows, blocks per row], sharded like the parameter's rows
        per_row = blocks_per_row(math.prod(p.shape[1:]))
        v, shape = v.view(w.shape[0], per_row), (p.shape[0], per_row)
    else:
        v, shape = v.view(w.shape), p.shape
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _from_saved(v: torch.Tensor, key: str, device: torch.device) -> torch.Tensor:
    v = local(v).to(device, copy=True)
    return v.reshape(-1) if key in Q_KEYS else v


def _hyper(group: dict[str, Any], step: float) -> torch.Tensor:
    """Step constants in the kernel's order, computed in double like torch.optim.AdamW, then rounded to fp32 (a CPU
    tensor: the kernel reads it there, and the torch-op path reads it without a device sync)."""
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    values = [1 - beta1, beta2, 1 - beta2, 1 - lr * wd, -lr / bc1, 1 / math.sqrt(bc2), group["eps"]]
    return torch.tensor(values, dtype=torch.float32)


def update_chunk(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ma: torch.Tensor, vq: torch.Tensor,
                 va: torch.Tensor, hp: torch.Tensor, tm: QuantTables, tv: QuantTables, ids: torch.Tensor) -> None:
    """The kernel's maths as torch ops (any device) on one chunk of whole blocks; `ids`: block of each value, `hp`
    the step's constants (on p's device, or the CPU: 0-d tensors either way, so a compiled step never recompiles
    for a new learning rate)."""
    w1, beta2, w2, decay, neg_step, ibc2s, eps = (hp[i].to(p.device) for i in range(7))
    m = tm.qmap[mq.long()] * ma[ids]
    v = tv.qmap[vq.long()] * va[ids]
    m = m + (g - m) * w1
    v = v * beta2 + (g * w2) * g
    denom = v.sqrt() * ibc2s + eps
    p.copy_(p * decay + (m / denom) * neg_step)
    for codes, absmax, x, t in ((mq, ma, m, tm), (vq, va, v, tv)):
        new_codes, new_absmax = quantize(x, t, ids, absmax.numel())
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
