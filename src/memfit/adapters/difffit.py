"""DiffFit (Xie et al., ICCV 2023): train biases, normalisation parameters and per-channel scales γ.

Each chosen block output gets a scale γ (initialised to 1), x ← x + γ ⊙ f(x). Because f(x) ends in a
Linear (the attention or MLP output projection), γ ⊙ (W·h + b) = (γ ⊙ W)·h + γ ⊙ b: γ lives on that
Linear as a per-output-channel scale and `merge()` folds it into W and b, so the merged model costs
nothing extra. Biases and normalisation parameters are the base tensors themselves, trained in place
and saved with the adapter. The paper trains with a learning rate about 10× the pre-training one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memfit.adapters.layer import AdapterLayer, float_dtype
from memfit.adapters.method import Method, Target
from memfit.adapters.placement import BlockOutputConfig
from memfit.adapters.targets import name_matches
from memfit.errors import ConfigError, TargetNotFoundError
from memfit.fields import option

_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


@dataclass
class DiffFitConfig(BlockOutputConfig):
    """DiffFit. γ goes on the block outputs named by `placement` (attention, mlp) in blocks `layers`."""

    method = "difffit"
    train_bias: bool = option(True, help="train every existing bias of the model")
    train_norm: bool = option(True, help="train the parameters of every normalisation layer (LayerNorm, RMSNorm...)")
    add_bias: list[str] | str | None = option(None, help="Linear layers that lack a bias and get a new trainable one "
                                              "(zeros): names matched as a path suffix, or a regex; None adds none")

    def __post_init__(self) -> None:
        if isinstance(self.add_bias, tuple):
            self.add_bias = list(self.add_bias)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.add_bias is not None and not self.add_bias:
            raise ConfigError("DiffFitConfig.add_bias is empty: name modules, or pass None to add no biases.")


class DiffFitLinear(AdapterLayer):
    """y = γ ⊙ (W·x + b): the block output scaled per output channel."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.gamma = nn.Parameter(torch.ones(self.out_features, dtype=float_dtype(base.weight),
                                             device=base.weight.device))

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.gamma.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if (self.gamma == 0).any():
            raise ConfigError(
                f"DiffFit γ of this layer has {int((self.gamma == 0).sum())} zero channel(s); merging would lose "
                "those rows of W for good (unmerge could not recover them). Keep the model unmerged."
            )
        self._scale(self.gamma)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._scale(1.0 / self.gamma.double())
            self.merged = False

    def _scale(self, factor: torch.Tensor) -> None:
        self.weight.copy_((self.weight.double() * factor.double()[:, None]).to(self.weight.dtype))
        if self.bias is not None:
            self.bias.copy_((self.bias.double() * factor.double()).to(self.bias.dtype))


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers: torch's own, and model-specific ones such as LlamaRMSNorm."""
    return isinstance(module, _TORCH_NORMS) or type(module).__name__.endswith("Norm")


def _prepare(model: nn.Module, targets: list[Target], config: DiffFitConfig) -> None:
    """Unfreeze biases and norms, and add the biases the config asks for."""
    if config.add_bias is not None:
        _add_biases(model, config.add_bias)
    for name, param in model.named_parameters():
        if config.train_bias and name.rpartition(".")[2] == "bias":
            param.requires_grad_(True)
    if config.train_norm:
        for module in model.modules():
            if is_norm(module):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(True)


def _add_biases(model: nn.Module, spec: list[str] | str) -> None:
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and name_matches(n, spec)]
    if not chosen:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TargetNotFoundError(f"DiffFitConfig.add_bias={spec!r} matched no Linear module. Linear names: {names}.")
    for _, module in chosen:
        if module.bias is None:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=float_dtype(w), device=w.device))


def _wrap(target: Target, config: DiffFitConfig, shared: nn.Module | None) -> DiffFitLinear:
    return DiffFitLinear(target.module)


METHOD = Method("difffit", DiffFitConfig, _wrap, prepare=_prepare)
