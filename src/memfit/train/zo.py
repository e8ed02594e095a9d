"""ZO2-style paired passes: both of MeZO's perturbed forwards in one visit of each layer.

MeZO runs the model twice per estimate, at θ + εz and at θ − εz. When layers stream from disk, two forwards read
every streamed layer twice. Here the batch is doubled instead, [x; x], and the model runs once: every *unit* (each
decoder layer, and each module outside the layers that owns trainable parameters) computes its first half at
θ + εz and its second half at θ − εz, then puts θ back, all while the unit's weights are resident. Modules between
units hold no trainable parameters, so they compute the same function on both halves. The result equals two
separate passes to float rounding (the same kernels on half-batches), and a step reads each streamed layer once.

Shared trainable state used inside every layer (MoS's shard pools, `memfit_shared`) is perturbed with each unit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from memfit.adapters.model import SHARED_NAME
from memfit.errors import ConfigError
from memfit.optim.mezo import Perturbation
from memfit.tiers.modules import find_layers
from memfit.train.tasks import Task


def _split(obj: Any, n: int, half: int) -> Any:
    """The `half`-th half of every tensor in `obj` whose batch dimension is 2n; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj[half * n:(half + 1) * n] if obj.dim() > 0 and obj.shape[0] == 2 * n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_split(o, n, half) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: _split(v, n, half) for k, v in obj.items()})
    return obj


def _join(a: Any, b: Any, n: int) -> Any:
    """The two halves' outputs as one batch of 2n (an output without a batch dimension is broadcast to n rows)."""
    if isinstance(a, torch.Tensor):
        if a.dim() == 0 or a.shape[0] not in (n, 1):
            raise ConfigError(f"MeZO's paired passes cannot join a module output of shape {tuple(a.shape)} for a "
                              f"half-batch of {n}; use --optim mezo without --weights-budget for this model.")
        if a.shape[0] != n:
            a, b = a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])
        return torch.cat([a, b])
    if isinstance(a, (tuple, list)):
        return type(a)(_join(x, y, n) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(a)(**{k: _join(a[k], b[k], n) for k in a})
    return a


class PairedForward:
    """Installs paired units on `model` for the parameters `params` (the optimizer's); see the module docstring.

    stream: the model's StreamHandle, if its layers stream (their units then run inside the read window).
    Outside `pairing()` every unit runs its ordinary forward.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], stream: Any = None) -> None:
        self.model = model
        trainable = {id(p) for p in params}
        prefix, layers = find_layers(model)
        self.shared = [p for n, p in model.named_parameters() if n.startswith(SHARED_NAME + ".") and id(p) in trainable]
        covered = {id(p) for p in self.shared}
        self._z: Perturbation | None = None
        self._half = 0
        self.visits = 0
        streamed = set(getattr(stream, "streamed", ()))
        units: list[tuple[str, nn.Module]] = [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]
        for name, module in model.named_modules():
            if (name == prefix or name.startswith(prefix + ".") or name.startswith(SHARED_NAME)
                    or any(name.startswith(u + ".") for u, _ in units)):
                continue
            if name and any(p is not None and id(p) in trainable for p in module._parameters.values()):
                units.append((name, module))
        for i, (_, module) in enumerate(units):
            own = [p for p in module.parameters() if id(p) in trainable]  # a tied tensor: in each unit using it
            covered |= {id(p) for p in own}
            wrap = functools.partial(self._paired, own)
            if i < len(layers) and i in streamed:
                stream.wrap_forward(i, wrap)
            else:
                module.forward = wrap(module.forward)
        missing = [n for n, p in model.named_parameters() if id(p) in trainable and id(p) not in covered]
        if missing:
            raise ConfigError(f"MeZO's paired passes (under --weights-budget) need every trained tensor inside a "
                              f"module the model calls; {missing[:3]} are not. Train without --weights-budget.")

    def _paired(self, params: list[torch.Tensor], forward: Callable) -> Callable:
        params = params + self.shared

        @functools.wraps(forward)
        def paired(*args, **kwargs):
            z, n = self._z, self._half
            if z is None or not params:  # no trained tensor here: one function for both halves
                return forward(*args, **kwargs)
            z.plus(params)
            at = 1.0
            try:  # on any error θ is put back before it propagates
                first = forward(*_split(args, n, 0), **_split(kwargs, n, 0))
                z.minus(params)
                at = -1.0
                second = forward(*_split(args, n, 1), **_split(kwargs, n, 1))
            finally:
                z.apply(params, -at)
            self.visits += 1
            return _join(first, second, n)

        return paired

    @contextmanager
    def pairing(self, z: Perturbation, half: int) -> Iterator[None]:
        """Within: a forward of a doubled batch (2·half rows) computes its halves at θ + εz and θ − εz."""
        self._z, self._half = z, half
        try:
            yield
        finally:
            self._z, self._half = None, 0

    def losses(self, z: Perturbation, task: Task, batches: list[dict[str, torch.Tensor]],
               n_targets: float) -> tuple[float, float]:
        """(L₊, L₋) of the update's micro-batches, each normalised by the update's targets."""
        plus = minus = 0.0
        for batch in batches:
            n = batch["input_ids"].shape[0]
            doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
            with self.pairing(z, n):
                per_example = task.example_losses(self.model, doubled)
            plus += float(per_example[:n].sum())
            minus += float(per_example[n:].sum())
        return plus / n_targets, minus / n_targets
