"""MeZO (Malladi et al., 2023): fine-tuning with forward passes only, in the memory of inference.

One estimate of one step, with a fresh seed s: θ ← θ + εz(s); L₊ = loss; θ ← θ − 2εz(s); L₋ = loss;
θ ← θ + εz(s) (θ back, to float rounding); g = (L₊ − L₋) / (2ε), the derivative of the loss along z. With q
estimates the update is θ ← θ − lr·(λθ + (1/q)·Σⱼ gⱼ·z(sⱼ)). z ~ N(0, I) is never stored: it is regenerated from its
seed, parameter by parameter and chunk by chunk (`CHUNK` values at a time), for each use (+ε, −2ε, then the last
+ε fused with the update: three passes over z per step), so no tensor of the parameters' size exists beside them
and no `.grad` is ever allocated.

Sparse MeZO (Liu et al., 2024): with `sparsity` s, only the (1 − s) share of each tensor's entries with the
smallest magnitude is perturbed and updated. The mask is derived from the weights at the start of each step (a
magnitude threshold per tensor) and held packed, one bit per entry, for that step only (the entries move by εz
inside the step, so re-deriving it from the perturbed weights could flip entries at the threshold).

The state is the step count and the seed (in each param group, so `state_dict()` and memfit's checkpoints carry
them): a resumed run draws the same z's, and continues bitwise.

ZO2 (Wang et al., 2025) needs both perturbed passes to go through a streamed layer while it is resident:
`step(paired=...)` hands the caller a `Perturbation` that perturbs any subset of the parameters by ±ε, so a forward
that visits the model layer by layer can run the + and − passes of each layer together
(`memfit.train.zo.PairedForward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from memfit.errors import ConfigError, TrainingError

CHUNK = 1 << 16  # values of z drawn at a time (256 KB in fp32); a multiple of 8, for the packed masks
_SAMPLE = 1 << 18  # entries a sparsity threshold is estimated from (exact below; ~0.2% quantile error above)
_MASK64 = (1 << 64) - 1
_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each): nearby steps and parameters get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as bits (uint8, 8 entries per byte)."""
    pad = (-mask.numel()) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    return (mask.view(-1, 8).to(torch.uint8) * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    return ((bits[:, None] >> torch.arange(8, device=bits.device, dtype=torch.uint8)) & 1).view(-1)[:n].bool()


def _threshold(p: torch.Tensor, keep: float) -> torch.Tensor:
    """The magnitude below which the `keep` share of p's entries lies (estimated from a strided sample above
    `_SAMPLE` entries, so no copy of a large tensor is made)."""
    flat = p.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        flat = flat[:: flat.numel() // _SAMPLE][:_SAMPLE]
    values = flat.abs().float()
    k = max(1, min(values.numel(), math.ceil(keep * values.numel())))
    return values.kthvalue(k).values


class Perturbation:
    """z(s) of one estimate, applied in place to any subset of the optimizer's parameters.

    `plus` takes θ to θ + εz, `minus` from θ + εz to θ − εz, `restore` from θ − εz back to θ; each regenerates z of
    each parameter from (s, the parameter's index), so any grouping of parameters (all at once, or layer by layer)
    draws the same z.
    """

    def __init__(self, optimizer: MeZO, seed: int) -> None:
        self.optimizer, self.seed = optimizer, seed

    def plus(self, params: Iterable[torch.Tensor]) -> None:
        self.apply(params, 1.0)

    def minus(self, params: Iterable[torch.Tensor]) -> None:
        self.apply(params, -2.0)

    def restore(self, params: Iterable[torch.Tensor]) -> None:
        self.apply(params, 1.0)

    @torch.no_grad()
    def apply(self, params: Iterable[torch.Tensor], times_eps: float) -> None:
        """θ ← θ + times_eps·ε·z for each of `params` (ε of the parameter's group)."""
        for p in params:
            index, group = self.optimizer.place(p)
            self.optimizer.add_z(p, index, self.seed, times_eps * group["eps"])


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO): `step(closure)` calls `closure()` (the loss, without backward) 2·perturbations times.

    lr: the learning rate (MeZO's paper: 1e-6 to 1e-7 for all weights of OPT, about 1e-4 for LoRA).
    eps: the perturbation scale ε (> 0). perturbations: estimates averaged per step (q).
    weight_decay: decoupled, θ ← θ − lr·λ·θ. sparsity: None, or the share of each tensor's entries left
        unperturbed (Sparse MeZO perturbs the small-magnitude rest). seed: the run's seed; step k's draws are a
        function of (seed, k) only.
    """

    zeroth_order = True  # no gradients, no states: the memory table and the trainer read this

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, perturbations: int = 1,
                 weight_decay: float = 0.0, sparsity: float | None = None, seed: int = 0) -> None:
        if not lr >= 0.0:
            raise ConfigError(f"MeZO lr must be >= 0, got {lr}.")
        if not eps > 0.0:
            raise ConfigError(f"MeZO eps (the perturbation scale, --zo-eps) must be > 0, got {eps}.")
        if perturbations < 1:
            raise ConfigError(f"MeZO perturbations (--zo-perturbations) must be >= 1, got {perturbations}.")
        if not weight_decay >= 0.0:
            raise ConfigError(f"MeZO weight_decay must be >= 0, got {weight_decay}.")
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"MeZO sparsity (--zo-sparsity) must be in [0, 1) (the share of entries left "
                              f"unperturbed), got {sparsity}.")
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay, "sparsity": sparsity, "seed": seed, "step": 0}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.dtype.is_floating_point:
                    raise ConfigError(f"MeZO perturbs floating-point parameters only; got one of dtype {p.dtype}.")
        self.perturbations = perturbations
        self._masks: dict[int, torch.Tensor] = {}
        self.last_estimates: list[float] = []  # the projected gradients g of the last step

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._place = {id(p): (i, g) for i, (p, g) in enumerate((p, g) for g in self.param_groups for p in g["params"])}

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def place(self, p: torch.Tensor) -> tuple[int, dict]:
        """(index, param group) of a parameter this optimizer trains."""
        try:
            return self._place[id(p)]
        except KeyError:
            raise ConfigError("MeZO was asked to perturb a tensor it does not train.") from None

    # -- z, chunk by chunk -------------------------------------------------------------------------------------
    def _chunks(self, p: torch.Tensor, index: int, seed: int):
        """(flat view of a chunk of p, z of that chunk), in order; z is drawn from (seed, index), masked."""
        flat = p.data.view(-1)
        gen = torch.Generator(device=p.device)
        gen.manual_seed(mix(seed, index))
        bits = self._masks.get(index)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            z = torch.randn(part.numel(), generator=gen, device=p.device, dtype=torch.float32)
            if bits is not None:
                z.mul_(_unpack(bits[start // 8:(start + part.numel() + 7) // 8], part.numel()))
            yield part, z

    def add_z(self, p: torch.Tensor, index: int, seed: int, alpha: float) -> None:
        """p ← p + alpha·z(seed, index), in place."""
        if not p.is_contiguous():
            raise ConfigError("MeZO perturbs parameters in place through a flat view; this one is not contiguous.")
        for part, z in self._chunks(p, index, seed):
            part.add_(z.to(part.dtype), alpha=alpha)

    def _build_masks(self) -> None:
        self._masks = {}
        for index, p in enumerate(self.params):
            sparsity = self._place[id(p)][1]["sparsity"]
            if sparsity:
                t = _threshold(p, 1.0 - sparsity)
                flat = p.detach().view(-1)
                self._masks[index] = torch.cat([_pack(flat[s:s + CHUNK].abs() <= t)
                                                for s in range(0, flat.numel(), CHUNK)])

    # -- steps ---------------------------------------------------------------------------------------------------
    def _seed(self, estimate: int) -> int:
        group = self.param_groups[0]
        return mix(group["seed"], group["step"], estimate)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None, *,  # type: ignore[override]
             paired: Callable[[Perturbation], Sequence[float]] | None = None) -> torch.Tensor:
        """One MeZO step; returns the mean of the perturbed losses.

        closure(): the loss at the current parameters, without backward (torch.optim's convention); MeZO perturbs
            all parameters, calls it, and perturbs again.
        paired(z): instead, computes (L₊, L₋) itself, perturbing with `z.plus / minus / restore` any grouping of the
            parameters and leaving every one restored: the ZO2 path runs both passes of each layer in one visit.
        """
        if (closure is None) == (paired is None):
            raise ConfigError("MeZO.step needs a closure that returns the loss (forward only, no backward), or a "
                              "paired estimate; exactly one of them.")
        pending: list[int] = []  # the seed whose last +ε is left to the update (fused into it)
        if paired is None:
            params = self.params
            last_seed = self._seed(self.perturbations - 1)

            def paired(z: Perturbation) -> tuple[float, float]:
                z.plus(params)
                at, minus = 1.0, math.nan
                try:  # +ε, −2ε, then +ε (the last estimate's is fused into the update: 3 passes over z, not 4);
                    plus = float(closure())  # on any error (a NaN, an exception) θ is put back first
                    if math.isfinite(plus):
                        z.minus(params)
                        at = -1.0
                        minus = float(closure())
                finally:
                    if z.seed == last_seed and at == -1.0 and math.isfinite(minus):
                        pending.append(z.seed)
                    else:
                        z.apply(params, -at)
                return plus, minus

        self._build_masks()
        try:
            seeds, grads, losses = [], [], []
            for j in range(self.perturbations):
                seed = self._seed(j)
                plus, minus = (float(v) for v in paired(Perturbation(self, seed)))
                self._check(plus, "+")
                self._check(minus, "−")
                seeds.append(seed)
                grads.append((plus - minus) / (2.0 * self.param_groups[0]["eps"]))
                losses.extend((plus, minus))
            self._update(seeds, grads, pending)
        except BaseException:
            for seed in pending:  # θ − εz was left for the update, which did not happen
                Perturbation(self, seed).restore(self.params)
            raise
        finally:
            self._masks = {}
        self.last_estimates = grads
        return torch.tensor(sum(losses) / len(losses))

    def _update(self, seeds: list[int], grads: list[float], pending: list[int]) -> None:
        """θ ← θ(1 − lr·λ) − lr·(1/q)·Σ gⱼ·z(sⱼ); a seed in `pending` finds θ − εz and adds its +ε in the same pass."""
        q = len(seeds)
        for group in self.param_groups:
            eps_ratio = group["eps"] / self.param_groups[0]["eps"]  # g was divided by group 0's ε
            decay = 1.0 - group["lr"] * group["weight_decay"]
            for p in group["params"]:
                index = self._place[id(p)][0]
                if decay != 1.0:
                    p.data.mul_(decay)
                for seed, g in zip(seeds, grads, strict=True):
                    restore = decay * group["eps"] if seed in pending else 0.0
                    self.add_z(p, index, seed, restore - group["lr"] * g * eps_ratio / q)
            group["step"] += 1
        pending.clear()

    def _check(self, loss: float, sign: str) -> None:
        if not math.isfinite(loss):
            raise TrainingError(f"the loss is {loss} in MeZO's {sign}ε pass at step {self.param_groups[0]['step'] + 1}"
                                f"; the parameters are restored (unperturbed, not updated). Lower the learning rate "
                                f"or the perturbation (--zo-eps, now {self.param_groups[0]['eps']:g}), or check the "
                                "data.")
