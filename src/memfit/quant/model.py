"""Quantize a model's frozen Linear weights in place, and back.

`quantize(model, QuantConfig(...))` swaps every eligible nn.Linear for a QuantLinear of the same name, and every
fused MoE experts module for QuantExperts (one quantized weight per expert and projection): all of them, or
`targets` only, except `skip` (output heads by default: they are trained, or tied to the embedding)
and weights shared with another module (a tied head would lose its tie). `embeddings=True` also quantizes the
input embedding (QuantEmbedding) and the output head, a tied head sharing the embedding's quantized weight.
`dequantize(model)` swaps them back to nn.Linear / nn.Embedding in fp32 (what `memfit merge` writes), ties kept.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.quant.blockwise import pack_scales, quantize_blocks
from memfit.quant.codebooks import CODEBOOKS
from memfit.quant.embedding import QuantEmbedding
from memfit.quant.experts import QuantExperts, fused_experts
from memfit.quant.linear import QuantLinear, QuantWeight
from memfit.tiers.modules import vocabulary

HEADS = ("lm_head", "classifier", "score", "qa_outputs", "cls")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantConfig:
    """kind: 'nf4' (4.13 bits per weight with double quantization) or 'int8' (8.13).
    block_size: weights per absmax. double_quant: quantize the absmax values too (8 bits, blocks of 256).
    targets: module names (path suffixes) or one regex to quantize (None: every nn.Linear).
    skip: names (path suffixes) kept in full precision.
    embeddings: quantize the input embedding and the output head too (a tied head stays tied)."""

    kind: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    targets: list[str] | str | None = None
    skip: list[str] = field(default_factory=lambda: list(HEADS))
    embeddings: bool = False

    def validate(self) -> None:
        if self.kind not in CODEBOOKS:
            raise ConfigError(f"unknown quantization kind {self.kind!r}; choose one of {sorted(CODEBOOKS)}.")
        if self.block_size < 2 or self.block_size % 2:
            raise ConfigError(f"block_size must be an even number >= 2 (64 is QLoRA's), got {self.block_size}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(name: str, names: list[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return any(name == n or name.endswith("." + n) for n in names)


def _shared(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> QuantWeight:
    if weight.dtype not in FLOATS:
        raise ConfigError(f"cannot quantize a {weight.dtype} weight; quantization takes fp32, fp16 or bf16 weights.")
    codes, absmax = quantize_blocks(weight, config.kind, config.block_size)
    scales = pack_scales(absmax) if config.double_quant else absmax
    return QuantWeight(config.kind, weight.shape, config.block_size, codes, scales, dtype=weight.dtype)


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize `model`'s Linear weights in place (see the module docstring); returns the model."""
    config = config or QuantConfig()
    config.validate()
    shared = _shared(model)
    chosen = []
    for name, module in model.named_modules():
        if not name or _matches(name, config.skip) or (config.targets is not None
                                                       and not _matches(name, config.targets)):
            continue
        if isinstance(module, QuantLinear):
            continue
        if not isinstance(module, nn.Linear):
            continue
        if type(module) is not nn.Linear:  # an adapter layer, or another library's Linear with its own forward
            raise ConfigError(f"cannot quantize {name}: a {type(module).__name__}, not a plain nn.Linear; quantize "
                              "before injecting adapters, or leave it out with skip.")
        if module.weight.is_meta:
            raise ConfigError(f"cannot quantize {name}: its weight is on the meta device (not loaded); load the "
                              "weights first (streamed bases read quantized checkpoints: memfit quantize).")
        if id(module.weight) in shared:
            continue
        chosen.append((name, module))
    experts = [(name, m) for name, m in model.named_modules() if name and fused_experts(m)
               and not _matches(name, config.skip) and (config.targets is None or _matches(name, config.targets))]
    if not chosen and not experts:
        raise ConfigError(f"found no nn.Linear module to quantize in this {type(model).__name__} (targets="
                          f"{config.targets!r}, skip={config.skip!r}); quantization swaps nn.Linear weights only.")
    for name, module in chosen:
        bias = None if module.bias is None else module.bias.detach()
        q = QuantLinear(quantize_weight(module.weight.detach(), config), bias)
        _set(model, name, q)
    if config.embeddings:
        _quantize_vocabulary(model, config)
    for name, module in experts:  # each expert's gate_up and down become weights of their own
        gate_up = [quantize_weight(w, config) for w in module.gate_up_proj.detach()]
        down = [quantize_weight(w, config) for w in module.down_proj.detach()]
        _set(model, name, QuantExperts(gate_up, down, module.act_fn))
    model.quantization = config  # how it was quantized: saved with the model, checked when it loads
    return model


def _quantize_vocabulary(model: nn.Module, config: QuantConfig) -> None:
    """The input embedding as a QuantEmbedding; the output head as a QuantLinear sharing its weight if tied."""
    embedding, head = vocabulary(model)
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise ConfigError(f"cannot quantize the embeddings of this {type(model).__name__}: its input embedding is a "
                          f"{type(embedding).__name__}, not a plain nn.Embedding (a scaled or renormalized one has "
                          "its own forward); quantize without embeddings.")
    if embedding.weight.is_meta:
        raise ConfigError("cannot quantize the embeddings: their weight is not loaded (meta device).")
    names = {id(m): n for n, m in model.named_modules()}
    quantized = QuantEmbedding(quantize_weight(embedding.weight.detach(), config), embedding.padding_idx)
    if type(head) is nn.Linear:
        tied = head.weight is embedding.weight
        weight = quantized.weight if tied else quantize_weight(head.weight.detach(), config)
        bias = None if head.bias is None else head.bias.detach()
        _set(model, names[id(head)], QuantLinear(weight, bias))
    _set(model, names[id(embedding)], quantized)


def dequantize(model: nn.Module) -> nn.Module:
    """Every quantized weight back in its original dtype, in place (returns the model): a QuantLinear becomes an
    nn.Linear, an adapter layer over a quantized base gets a plain frozen weight (so it can merge)."""
    for name, module in model.named_modules():  # checked before anything changes
        if isinstance(module, QuantExperts):
            raise ConfigError(f"{name} holds quantized MoE experts, which do not dequantize back into transformers' "
                              "fused experts; merge or export from the fp32 checkpoint of this model.")
    dense_of: dict[int, nn.Parameter] = {}  # one fp32 Parameter per quantized weight: tied modules stay tied
    for name, module in list(model.named_modules(remove_duplicate=False)):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, QuantWeight):
            continue
        if id(weight) not in dense_of:
            dense_of[id(weight)] = nn.Parameter(weight.dequantize().view(weight.shape[0], -1), requires_grad=False)
        dense = dense_of[id(weight)]
        if isinstance(module, QuantEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                     device="meta")
            embedding.weight = dense
            _set(model, name, embedding)
        elif isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device=dense.device,
                               dtype=dense.dtype)
            linear.weight, linear.bias = dense, module.bias
            _set(model, name, linear)
        else:
            module.weight = dense
    if hasattr(model, "quantization"):
        del model.quantization
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantWeight]:
    """The quantized weights of `model` by their names ('...q_proj.weight')."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
