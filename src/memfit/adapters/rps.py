"""STABLE-RPS (Desai & Shrivastava, ICLR 2024): train a model whose weights share one small memory z.

The weights of the chosen Linear and Embedding modules are laid end to end in one virtual array of n
entries; entry i of module μ reads

    w_i = λ_μ · g(i) · z[idx(i)],   idx(i) = (h(⌊i/m⌋) + i mod m) mod m        (RandomFold)

with z ∈ ℝ^m, m = compression·n, g a ±1 sign hash and h a hash of the fold number. Each fold of m
consecutive entries is a rotation of z, so every slot holds ⌊n/m⌋ or ⌈n/m⌉ weights (optimal load) and
at compression 1 the map is a bijection: the compressed model *is* the dense model (Pareto-continuity).

Gradient scaling: z's gradient at slot j is multiplied by count_j / Σ_{i→j} λ²_{μ(i)}, so a step on z
moves each weight as a dense step would (at 1× with SGD, exactly), whatever the scales λ; this is
what removes ROAST's sensitivity to the initialisation scale.

This is not an adapter: every parameter trains, from the start. It rides the adapter contract
(`memfit.compress` = `memfit.inject` with an RPSConfig) so save/load, trainable counts and the trainer
work unchanged; the "adapter" is the whole compressed model. Weights are materialised on the fly per
forward (vectorised; only z is stored), Embedding rows are gathered without materialising the table.
It saves memory, not FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memfit.adapters.config import AdapterConfig
from memfit.adapters.layer import float_dtype
from memfit.adapters.method import Method, Target
from memfit.adapters.model import SHARED_NAME, inject
from memfit.errors import ConfigError
from memfit.fields import option

P = 2**31 - 1  # Mersenne prime of the universal hashes; (a·(x mod P) + b) stays below 2^63 in int64
MERGE_ERROR = (
    "STABLE-RPS has no base weights to fold into (the compressed weights are the model); "
    "memfit.decompress(model) materialises them as ordinary dense modules."
)


@dataclass
class RPSConfig(AdapterConfig):
    """STABLE-RPS compression of the Linear and Embedding weights of a model. target_modules: the Linear/Embedding
    modules to compress (None = all of them); modules_to_save stay dense.

    sigma_z: λ_μ = std(W_μ) / sigma_z is rounded to a power of two so that folding the dense weights into z and
    reading them back is exact in floating point; the default, HF's usual initializer_range, keeps λ ≈ 1 so an
    Adam step on z moves a weight as much as a dense step.
    """

    method = "rps"
    compression: float = option(0.1, help="size of the shared memory z relative to the weights it replaces, in "
                                "(0, 1]: 0.1 = 10x smaller, 1 = the dense model exactly", flag=True)
    sigma_z: float = option(0.02, help="the scale of z (see RPSConfig's docstring)")
    gradient_scaling: bool = option(True, help="STABLE-RPS's per-slot gradient scaling (false: plain ROAST "
                                    "gradients)")
    seed: int = option(0, help="seeds the hashes h and g")

    def validate(self) -> None:
        if not 0.0 < self.compression <= 1.0:
            raise ConfigError(
                f"RPSConfig.compression={self.compression} must be in (0, 1]: it is the size of the shared memory "
                "relative to the weights (0.1 = 10× compression, 1.0 = no compression)."
            )
        if not self.sigma_z > 0:
            raise ConfigError(f"RPSConfig.sigma_z must be > 0, got {self.sigma_z}.")

    def default_targets(self, model: Any) -> str:
        return ".*"  # every Linear and Embedding module


def _uhash(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """A member of the universal family ((a·x + b) mod P) on int64 tensors."""
    return (a * (x % P) + b) % P


class _ScaledGather(torch.autograd.Function):
    """z[idx] forward; backward scatters the incoming gradient multiplied by the slot's scale."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, scale)
        ctx.m = z.shape[0]
        return z[idx]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        idx, scale = ctx.saved_tensors
        flat = idx.reshape(-1)
        grad_z = torch.zeros(ctx.m, dtype=grad.dtype, device=grad.device)
        grad_z.index_add_(0, flat, grad.reshape(-1) * scale[flat].to(grad.dtype))
        return grad_z, None, None


class RPSMemory(nn.Module):
    """The shared memory z [m] and the map from the n virtual weights into it.

    Segment s (one per distinct weight tensor; tied weights share a segment) covers virtual positions
    [offsets[s], offsets[s] + sizes[s]) and has scale lam[s] (saved: it comes from the dense init).
    segment_of maps each compressed module's path to its segment.
    """

    def __init__(self, sizes: list[int], lam: list[float], m: int, segment_of: dict[str, int], config: RPSConfig,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.sizes, self.segment_of = list(sizes), dict(segment_of)
        self.offsets = [sum(sizes[:s]) for s in range(len(sizes))]
        self.n, self.m = sum(sizes), m
        self.gradient_scaling = config.gradient_scaling
        gen = torch.Generator().manual_seed(config.seed)
        self.hash_keys = torch.randint(1, P, (5,), generator=gen).tolist()
        self.z = nn.Parameter(torch.zeros(m, dtype=dtype, device=device))
        self.register_buffer("lam", torch.tensor(lam, dtype=torch.float32, device=device))
        # h of every fold, looked up per element: integer `%` is the costliest op of materialisation.
        self.register_buffer("heads", self.fold_hash(torch.arange(-(-self.n // m), device=device)), persistent=False)
        self._scale: torch.Tensor | None = None
        self._scale_key: torch.Tensor | None = None

    def fold_hash(self, folds: torch.Tensor) -> torch.Tensor:
        """h(f): the rotation of fold f, in [0, m)."""
        return _uhash(folds, self.hash_keys[0], self.hash_keys[1]) % self.m

    def index(self, positions: torch.Tensor) -> torch.Tensor:
        """RandomFold: idx(i) = (h(⌊i/m⌋) + i mod m) mod m for global positions i."""
        fold = positions // self.m
        idx = self.heads[fold] + (positions - fold * self.m)  # both terms < m, so one conditional subtract
        return torch.where(idx >= self.m, idx - self.m, idx)

    def sign(self, positions: torch.Tensor) -> torch.Tensor:
        """g(i) ∈ {−1, +1}: a universal hash, an xorshift, then a multiply-shift whose high bit is the sign."""
        y = _uhash(positions, self.hash_keys[2], self.hash_keys[3])  # < 2^31
        y = (y ^ (y >> 15)) * self.hash_keys[4]  # < 2^62: no int64 overflow
        return 1 - 2 * ((y >> 45) & 1)

    def weights(self, segment: int, local: torch.Tensor) -> torch.Tensor:
        """λ_s · g(i) · z[idx(i)] for positions `local` inside segment s (any shape), vectorised."""
        positions = local + self.offsets[segment]
        idx = self.index(positions)
        if self.gradient_scaling and torch.is_grad_enabled() and self.z.requires_grad:
            values = _ScaledGather.apply(self.z, idx, self.grad_scale())
        else:
            values = self.z[idx]
        return values * (self.sign(positions).to(values.dtype) * self.lam[segment].to(values.dtype))

    def materialise(self, segment: int) -> torch.Tensor:
        return self.weights(segment, torch.arange(self.sizes[segment], device=self.z.device))

    def slot_sums(self, per_segment: torch.Tensor) -> torch.Tensor:
        """Σ over the weights mapped to each slot of their segment's value, in O(m + folds) (no pass over n).

        Each (segment, fold) overlap is a run of consecutive positions, which RandomFold sends to one
        circular range of slots; ranges are summed with a difference array.
        """
        m, values = self.m, per_segment.double().cpu()
        heads = self.heads.cpu()
        starts, lengths, vals = [], [], []
        for s, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            folds = torch.arange(off // m, (off + size - 1) // m + 1)
            lo = torch.clamp(folds * m, min=off)
            hi = torch.clamp((folds + 1) * m, max=off + size)
            starts.append((heads[folds] + lo - folds * m) % m)
            lengths.append(hi - lo)
            vals.append(values[s].expand(len(folds)))
        start, v = torch.cat(starts), torch.cat(vals)
        end = start + torch.cat(lengths)
        wrap = end > m
        diff = torch.zeros(m + 1, dtype=torch.float64)
        diff.index_add_(0, start, v).index_add_(0, torch.where(wrap, m, end), -v)
        diff.index_add_(0, torch.zeros_like(end[wrap]), v[wrap]).index_add_(0, end[wrap] - m, -v[wrap])
        return diff.cumsum(0)[:m]

    def grad_scale(self) -> torch.Tensor:
        """count_j / Σ_{i→j} λ², cached until λ changes (e.g. when a saved model is loaded)."""
        key = self.lam.detach().cpu()
        if self._scale is None or self._scale.device != self.z.device or not torch.equal(self._scale_key, key):
            lam2 = key.double() ** 2
            scale = self.slot_sums(torch.ones_like(lam2)) / self.slot_sums(lam2)
            self._scale, self._scale_key = scale.to(self.z.device, self.z.dtype), key.clone()
        return self._scale

    @torch.no_grad()
    def fold_in(self, weights: list[torch.Tensor]) -> None:
        """z_j = Σ_{i→j} g(i)·w_i/λ / √count_j: the dense model itself at 1×, and for independent initial
        weights the same scale at any compression (a sum of count_j random-signed terms over √count_j)."""
        acc = torch.zeros(self.m, dtype=torch.float64, device=self.z.device)
        for s, w in enumerate(weights):
            positions = torch.arange(self.sizes[s], device=self.z.device) + self.offsets[s]
            signed = w.detach().reshape(-1).double() * self.sign(positions).double() / float(self.lam[s])
            acc.index_add_(0, self.index(positions), signed)
        count = self.slot_sums(torch.ones(len(self.sizes))).to(acc.device)
        self.z.copy_(acc / count.sqrt())

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, segments={len(self.sizes)}, gradient_scaling={self.gradient_scaling}"


class RPSLinear(nn.Module):
    """A Linear whose weight is read from the shared memory at each forward; the bias stays dense."""

    def __init__(self, base: nn.Linear, memory: RPSMemory, segment: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = base.bias
        self.segment, self.weight_dtype = segment, base.weight.dtype
        self._memory = (memory,)  # a tuple hides the shared module from this module's children

    @property
    def weight(self) -> torch.Tensor:
        w = self._memory[0].materialise(self.segment)
        return w.view(self.out_features, self.in_features).to(self.weight_dtype)  # [n_s] -> [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, segment={self.segment}"


class RPSEmbedding(nn.Module):
    """An Embedding that gathers only the looked-up rows from the shared memory."""

    def __init__(self, base: nn.Embedding, memory: RPSMemory, segment: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.segment, self.weight_dtype = segment, base.weight.dtype
        self._memory = (memory,)

    @property
    def weight(self) -> torch.Tensor:
        w = self._memory[0].materialise(self.segment)
        return w.view(self.num_embeddings, self.embedding_dim).to(self.weight_dtype)  # [n_s] -> [V, d]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"token id out of range [0, {self.num_embeddings}): got min {int(ids.min())}, max {int(ids.max())}."
            )
        d = self.embedding_dim
        local = ids[..., None] * d + torch.arange(d, device=ids.device)  # [..., d]: row ids·d + column
        rows = self._memory[0].weights(self.segment, local)
        if self.padding_idx is not None:  # like nn.Embedding: the padding row gets no gradient
            rows = torch.where((ids == self.padding_idx)[..., None], rows.detach(), rows)
        return rows.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, segment={self.segment}"


def _check_embedding(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        raise ConfigError(
            f"RPS cannot compress {name!r}: Embedding options max_norm, scale_grad_by_freq and sparse act on a "
            "dense table. Leave it dense via modules_to_save, or build the model without those options."
        )


def _scale_for(w: torch.Tensor, sigma_z: float) -> float:
    """λ = std(W)/σ_z rounded to a power of two (exact to multiply and divide by); 1 for constant weights."""
    std = float(w.detach().double().std(unbiased=False)) if w.numel() > 1 else 0.0
    return 2.0 ** round(math.log2(std / sigma_z)) if std > 0 and math.isfinite(std) else 1.0


def build_memory(targets: list[Target], config: RPSConfig) -> RPSMemory:
    """One segment per distinct weight tensor, λ from its current values, z folded from the dense weights."""
    segment_of: dict[int, int] = {}
    weights: list[torch.Tensor] = []
    for target in targets:
        _check_embedding(target.name, target.module)
        w = target.module.weight
        if id(w) not in segment_of:
            segment_of[id(w)] = len(weights)
            weights.append(w)
    sizes = [w.numel() for w in weights]
    m = max(1, round(config.compression * sum(sizes)))
    dtype = float_dtype(weights[0])
    lam = [_scale_for(w, config.sigma_z) for w in weights]
    segments = {t.name: segment_of[id(t.module.weight)] for t in targets}
    memory = RPSMemory(sizes, lam, m, segments, config, dtype, weights[0].device)
    memory.fold_in(weights)
    return memory


def _wrap(target: Target, config: RPSConfig, memory: nn.Module | None) -> nn.Module:
    assert isinstance(memory, RPSMemory)
    cls = RPSEmbedding if isinstance(target.module, nn.Embedding) else RPSLinear
    return cls(target.module, memory, memory.segment_of[target.name])


def _train_everything(model: nn.Module, targets: list[Target], config: RPSConfig) -> None:
    # Compressed models train from the start: z and every remaining dense tensor (biases, norms, heads).
    for p in model.parameters():
        p.requires_grad_(True)


def _report(model: nn.Module) -> dict[str, Any]:
    return {"footprint": rps_footprint(model)}


METHOD = Method("rps", RPSConfig, _wrap, build_shared=build_memory, target_types=(nn.Linear, nn.Embedding),
                prepare=_train_everything, merge_error=MERGE_ERROR, from_scratch=True, report=_report)


def compress(model: nn.Module, config: RPSConfig) -> nn.Module:
    """Replace the chosen Linear/Embedding weights of `model` by the shared memory, in place.

    z is folded from the model's current weights: initialise the dense model as usual first (at 1× the
    compressed model reproduces it exactly). Every parameter of the result trains.
    """
    if not isinstance(config, RPSConfig):
        raise ConfigError(f"compress() takes an RPSConfig, got {type(config).__name__}; use inject() for adapters.")
    return inject(model, config)


def _memory(model: nn.Module) -> RPSMemory:
    memory = getattr(model, SHARED_NAME, None)
    if not isinstance(memory, RPSMemory):
        raise ConfigError("this model is not compressed with STABLE-RPS; call memfit.compress(model, RPSConfig()).")
    return memory


@torch.no_grad()
def decompress(model: nn.Module) -> nn.Module:
    """Materialise every compressed module as an ordinary nn.Linear / nn.Embedding (tied weights stay tied).

    The result is a plain dense model (no memfit state), e.g. for `save_pretrained` or faster inference.
    """
    _memory(model)
    dense: dict[int, nn.Parameter] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (RPSLinear, RPSEmbedding)):
            continue
        weight = dense.setdefault(module.segment, nn.Parameter(module.weight.detach().clone()))
        if isinstance(module, RPSLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            plain.bias = module.bias
        else:
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
        plain.weight = weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    delattr(model, SHARED_NAME)
    for attr in ("memfit_config", "memfit_base_keys", "memfit_targets"):
        delattr(model, attr)
    return model


def rps_footprint(model: nn.Module) -> dict[str, int | float]:
    """Memory of the compressed model: z against the dense weights it replaces, and the rest."""
    memory = _memory(model)
    elt = memory.z.element_size()
    others = [p for p in model.parameters() if p is not memory.z]
    return {
        "compressed_params": memory.n,
        "dense_bytes": memory.n * elt,
        "z_params": memory.m,
        "z_bytes": memory.m * elt,
        "compression": memory.m / memory.n,
        "other_params": sum(p.numel() for p in others),
        "other_bytes": sum(p.numel() * p.element_size() for p in others),
    }
