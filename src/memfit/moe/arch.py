"""MoE architectures memfit can offload: a registry of how each lays out its experts on disk.

In memory (transformers 5) every supported family has the same shape: decoder layer `i` holds
`mlp.gate` (a router returning (logits, top-k weights, top-k indices)) and `mlp.experts` (fused
`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], called as `experts(hidden [T, H], top_k_index
[T, k], top_k_weights [T, k])`). On disk, checkpoints keep one tensor per expert and projection under
family-specific names, which is what an entry here records. Adding a family is one `register(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memfit.errors import ConfigError


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


@dataclass(frozen=True)
class MoeArch:
    """One model family.

    disk_block: the MoE block's name in checkpoints ("block_sparse_moe" for Mixtral; "mlp" elsewhere).
    projections: the per-expert (gate, up, down) projection names on disk.
    scores: router logits -> per-expert probabilities (softmax, or sigmoid for DeepSeek-V3).
    norm: the decoder layer's norm in front of the MoE block; its input is the residual stream.
    """

    model_type: str
    disk_block: str = "mlp"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    scores: Callable[[torch.Tensor], torch.Tensor] = softmax_scores
    norm: str = "post_attention_layernorm"

    def disk_names(self, name: str) -> list[str]:
        """Checkpoint keys a non-expert tensor of the in-memory model may have (its own name first)."""
        names = [name]
        if self.disk_block != "mlp" and ".mlp." in name:
            names.append(name.replace(".mlp.", f".{self.disk_block}.", 1))
        return names

    def expert_keys(self, layer: str, expert: int) -> list[tuple[str, str, str]]:
        """Candidate per-expert (gate, up, down) keys of `expert` in the layer with prefix `layer`."""
        blocks = dict.fromkeys([self.disk_block, "mlp"])
        return [tuple(f"{layer}.{block}.experts.{expert}.{p}.weight" for p in self.projections) for block in blocks]

    def fused_keys(self, layer: str) -> tuple[str, str]:
        """Keys of checkpoints saved in the fused in-memory layout."""
        return f"{layer}.mlp.experts.gate_up_proj", f"{layer}.mlp.experts.down_proj"


ARCHS: dict[str, MoeArch] = {}


def register(arch: MoeArch) -> MoeArch:
    ARCHS[arch.model_type] = arch
    return arch


register(MoeArch("mixtral", disk_block="block_sparse_moe", projections=("w1", "w3", "w2")))
register(MoeArch("qwen2_moe"))  # its gated shared expert is an ordinary resident MLP
register(MoeArch("qwen3_moe"))
register(MoeArch("olmoe"))
register(MoeArch("deepseek_v3", scores=sigmoid_scores))  # selection bias and group-limited top-k live in its router


def arch_for(config) -> MoeArch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(f"memfit moe cannot offload model_type {model_type!r}: it supports {sorted(ARCHS)}. A dense "
                          "model has no experts to offload; run it with memfit's weight streaming instead.")
    return ARCHS[model_type]


def moe_layers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{layer index: (module path, decoder layer)} of the layers whose `mlp` is a routed MoE block."""
    layers = model.get_decoder().layers
    prefix = next(name for name, m in model.named_modules() if m is layers)
    found = {}
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        if all(isinstance(getattr(block, name, None), nn.Module) for name in ("experts", "gate")):
            found[i] = (f"{prefix}.{i}", layer)
    if not found:
        raise ConfigError(f"the model ({type(model).__name__}) has no MoE layers (no `mlp.experts` with a router); "
                          "check num_experts / mlp_only_layers in its config.json.")
    return found


def expert_shape(experts: nn.Module) -> tuple[int, int, int]:
    """(num_experts, hidden, intermediate) of a transformers 5 fused experts module (or memfit's quantized one);
    unsupported layouts are errors."""
    if hasattr(experts, "expert_shape"):
        return experts.expert_shape
    unsupported = [flag for flag in ("has_bias", "is_transposed") if getattr(experts, flag, False)]
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        unsupported.append("no gate / interleaved gate_up")
    if unsupported:
        raise ConfigError(f"{type(experts).__name__} uses an expert layout memfit does not offload ({unsupported}).")
    E, two_i, H = experts.gate_up_proj.shape  # [E, 2I, H]
    return E, H, two_i // 2
