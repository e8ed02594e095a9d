"""Placing adapters by role: the output projection of each block's attention and MLP.

DiffFit and Compacter act on block outputs, not on named projections, so their configs say
*where* ("attention", "mlp") and *which blocks*; this table turns that into module paths per model
type. `target_modules` still overrides it for model types the table does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memfit.adapters.config import AdapterConfig
from memfit.errors import ConfigError
from memfit.fields import option

PLACEMENTS = ("attention", "mlp")

_LLAMA_LIKE = {"attention": r"self_attn\.o_proj", "mlp": r"mlp\.down_proj"}
_BERT_LIKE = {"attention": r"attention\.output\.dense", "mlp": r"output\.dense"}
# Path after the block index `<blocks>.<i>.` -> regex, by `model.config.model_type`. Mixture-of-experts
# models have no "mlp" entry: their MLP output is the fused experts tensor, not a Linear.
BLOCK_OUTPUTS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "mixtral": {"attention": r"self_attn\.o_proj"},
    "qwen2_moe": {"attention": r"self_attn\.o_proj"},
    "qwen3_moe": {"attention": r"self_attn\.o_proj"},
    "olmoe": {"attention": r"self_attn\.o_proj"},
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": {"attention": r"attention\.out_lin", "mlp": r"ffn\.lin2"},
    "opt": {"attention": r"self_attn\.out_proj", "mlp": r"fc2"},
}
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")


@dataclass
class BlockOutputConfig(AdapterConfig):
    """Config fields of methods placed on block outputs. target_modules, when given, names the modules directly
    and replaces `placement`/`layers` (for model types the placement table does not know)."""

    placement: list[str] = option(factory=lambda: list(PLACEMENTS), help="which block outputs get the method: "
                                  "'attention' and/or 'mlp'")
    layers: list[int] | None = option(None, help="block indices to adapt (None: every block)")

    def __post_init__(self) -> None:
        if isinstance(self.placement, tuple):
            self.placement = list(self.placement)
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        super().__post_init__()

    def validate(self) -> None:
        name = type(self).__name__
        bad = [p for p in self.placement if p not in PLACEMENTS]
        if bad or not self.placement:
            raise ConfigError(
                f"{name}.placement={self.placement!r}: each entry must be one of {list(PLACEMENTS)} "
                "(the attention and MLP outputs of a block), and at least one is needed."
            )
        if len(set(self.placement)) != len(self.placement):
            raise ConfigError(f"{name}.placement={self.placement!r} repeats an entry; list each once.")
        if self.layers is not None:
            if not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise ConfigError(f"{name}.layers={self.layers!r} must be a non-empty list of block indices >= 0.")
            if self.target_modules is not None:
                raise ConfigError(
                    f"{name}: layers and target_modules both given; layers selects blocks through `placement`. "
                    "Drop target_modules, or write the block indices into a target_modules regex."
                )

    def default_targets(self, model: Any) -> str:
        """A regex over module paths matching the chosen block outputs of `model`."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = BLOCK_OUTPUTS.get(model_type)
        if table is None:
            raise ConfigError(
                f"{type(self).__name__}: no placement table for model type {model_type!r} (known: "
                f"{sorted(BLOCK_OUTPUTS)}); name the block output projections in target_modules."
            )
        missing = [p for p in self.placement if p not in table]
        if missing:
            raise ConfigError(
                f"model type {model_type!r} has no Linear {missing[0]!r} output (its MLP is a mixture of experts); "
                f"use placement={[p for p in self.placement if p in table] or ['attention']} or name target_modules."
            )
        blocks = r"\d+"
        if self.layers is not None:
            _check_layers(model, self.layers)
            blocks = "|".join(str(i) for i in sorted(set(self.layers)))
        suffixes = "|".join(table[p] for p in self.placement)
        return rf"(?:.*\.)?(?:{blocks})\.(?:{suffixes})"


def _check_layers(model: Any, layers: list[int]) -> None:
    config = getattr(model, "config", None)
    count = next((getattr(config, f) for f in _LAYER_COUNT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if count is not None and max(layers) >= count:
        raise ConfigError(f"layers={layers} asks for block {max(layers)}, but the model has blocks 0..{count - 1}.")
