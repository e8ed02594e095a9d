"""Full fine-tuning: the model's own weights train, and no adapter module is added.

The baseline every adapter is measured against, and what zeroth-order training (MeZO full-parameter) and the
low-state full-parameter optimizers update. With `target_modules` unset every parameter trains (embeddings,
norms and head included); naming modules trains only their weights. The run saves the trained tensors (for an
unrestricted run, the whole model) in `adapter.safetensors`; `memfit merge` writes them as a plain checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from memfit.adapters.config import AdapterConfig
from memfit.adapters.method import Method, Target
from memfit.fields import option


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning; `target_modules` (None: the whole model) names the modules whose weights train."""

    method = "full"
    target_modules: list[str] | str | None = option(
        None, help="modules whose weights train (names matched as a suffix of the dotted path, a regex, or "
        "'all-linear'); None: every parameter of the model, embeddings, norms and head included")

    def default_targets(self, model: Any) -> str:
        return "all-linear"  # only resolves the spec: with target_modules None, `_prepare` unfreezes everything


def _prepare(model: nn.Module, targets: list[Target], config: FullConfig) -> None:
    modules = [model] if config.target_modules is None else [t.module for t in targets]
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)


def _wrap(target: Target, config: FullConfig, shared: nn.Module | None) -> nn.Module:
    return target.module  # the weights train where they are


METHOD = Method("full", FullConfig, _wrap, prepare=_prepare)
