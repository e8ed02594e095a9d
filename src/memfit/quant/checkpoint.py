"""Quantized checkpoints: a model quantized once, written as safetensors (codes and scales under the weight's
name) beside the usual config and tokenizer, and `memfit_quant.json`: how it was quantized and each quantized
weight's shape. Loading builds the model on the meta device and reads the tensors as stored, so no fp32 copy of
a quantized weight ever exists (peak memory is the quantized model, not the full one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from memfit.errors import CheckpointError
from memfit.quant.blockwise import ABSMAX_BLOCK, PackedScales, blocks
from memfit.quant.codebooks import BITS
from memfit.quant.embedding import QuantEmbedding
from memfit.quant.experts import QuantExperts
from memfit.quant.linear import QuantLinear, QuantWeight
from memfit.quant.model import QuantConfig, _set
from memfit.tiers.files import replace_dir

QUANT_FILE = "memfit_quant.json"
WEIGHTS = "model.safetensors"
FORMAT = "memfit-quantized/1"


def is_quantized_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def save_quantized(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a quantized `model` (see `memfit.quant.quantize`) to `out` atomically (replacing it whole)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    if not weights and not experts and not embeddings:
        raise CheckpointError("the model has no quantized weight to save; quantize it first (memfit.quant.quantize).")
    state, seen, tied = {}, {}, {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ident in seen and tensor.numel():  # a tied tensor is stored once; loading ties it again
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    config: QuantConfig = getattr(model, "quantization", QuantConfig())
    meta = {"format": FORMAT, "quantization": config.to_dict(), "tied": tied,
            "weights": {name: _record(w) | _tie(w, embeddings) for name, w in weights.items()},
            "embeddings": {name: _record(m.weight) | {"padding_idx": m.padding_idx} for name, m in embeddings.items()},
            "experts": {name: {"num_experts": m.num_experts, "gate_up": _record(m.gate_up_proj[0]),
                               "down": _record(m.down_proj[0])} for name, m in experts.items()}}
    out = Path(out)
    with replace_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def _tie(w: QuantWeight, embeddings: dict[str, QuantEmbedding]) -> dict:
    """{"tied_to": embedding} for a head that holds a quantized embedding's weight (rebuilt shared on load)."""
    return next(({"tied_to": n} for n, m in embeddings.items() if m.weight is w), {})


def _record(w: QuantWeight) -> dict:
    return {"kind": w.kind, "shape": list(w.shape), "block_size": w.block_size, "double_quant": w.double_quant,
            "dtype": str(w.dtype).removeprefix("torch.")}


def read_meta(root: Path) -> dict:
    try:
        meta = json.loads((root / QUANT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root / QUANT_FILE} cannot be read ({e}); quantize the model again "
                              "(memfit quantize).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("weights"), dict):
        raise CheckpointError(f"{root / QUANT_FILE} is not a memfit quantized-checkpoint record ({FORMAT}); quantize "
                              "the model again (memfit quantize).")
    return meta


def _shell(info: dict, name: str, bias: torch.Tensor | None) -> QuantLinear:
    """An empty QuantLinear (meta tensors) of the recorded shape, to be filled from the checkpoint."""
    return QuantLinear(empty_weight(info, name), bias)


def empty_weight(info: dict, name: str) -> QuantWeight:
    try:
        kind, shape, block = info["kind"], torch.Size(info["shape"]), int(info["block_size"])
        dtype = getattr(torch, info.get("dtype", "float32"))
        n, nb = shape.numel(), blocks(shape.numel(), block)
        codes = torch.empty((n * BITS[kind] + 7) // 8, dtype=torch.uint8, device="meta")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{QUANT_FILE}: the record of {name} is malformed ({e}); quantize the model again.") \
            from e
    if info.get("double_quant"):
        scales = PackedScales(torch.empty(nb, dtype=torch.uint8, device="meta"),
                              torch.empty(blocks(nb, ABSMAX_BLOCK), device="meta"), torch.empty((), device="meta"))
    else:
        scales = torch.empty(nb, device="meta")
    return QuantWeight(kind, shape, block, codes, scales, dtype=dtype)


def empty_quantized(cls: Any, root: Path, config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of the quantized checkpoint in `root` with every tensor on the meta device (buffers computed at
    construction stay real), its quantized Linears in place: what `load_quantized` fills, or weight streaming
    reads layer by layer."""
    from memfit.tiers.modules import empty_weights

    meta = read_meta(root)
    with empty_weights():
        model = cls.from_config(config, dtype=dtype)
    for name, info in meta["weights"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{root}: {QUANT_FILE} names a module {name!r} the {type(model).__name__} does not "
                                  "have; the checkpoint does not match its config (quantize again).") from None
        _set(model, name, _shell(info, name, None if module.bias is None else module.bias))
    for name, info in meta.get("embeddings", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{root}: {QUANT_FILE} names an embedding {name!r} the {type(model).__name__} does "
                                  "not have; the checkpoint does not match its config (quantize again).") from None
        _set(model, name, QuantEmbedding(empty_weight(info, name), info.get("padding_idx")))
    for name, info in meta["weights"].items():  # a head tied to a quantized embedding shares its weight module
        if info.get("tied_to") in meta.get("embeddings", {}):
            _set(model, f"{name}.weight", model.get_submodule(info["tied_to"]).weight)
    for name, info in meta.get("experts", {}).items():
        try:
            module = model.get_submodule(name)
            n = int(info["num_experts"])
            shell = QuantExperts([empty_weight(info["gate_up"], name) for _ in range(n)],
                                 [empty_weight(info["down"], name) for _ in range(n)], module.act_fn)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{root}: {QUANT_FILE} records experts {name!r} that do not fit the "
                                  f"{type(model).__name__} ({e}); quantize the model again.") from None
        _set(model, name, shell)
    model.quantization = QuantConfig(**meta.get("quantization", {}))
    return model


def load_quantized(cls: Any, root: Path, config: Any, **kwargs: Any) -> tuple[nn.Module, dict]:
    """(model, {'missing_keys': [...]}) of the quantized checkpoint in `root`; `config` is its transformers config.
    Keys the checkpoint lacks are reported (a fresh head), as from_pretrained does."""
    meta = read_meta(root)
    model = empty_quantized(cls, root, config, kwargs.get("dtype", torch.float32))
    expected = model.state_dict()
    path = root / WEIGHTS
    loaded = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key not in expected:
                    raise CheckpointError(f"{path} holds {key!r}, which the model does not have; the checkpoint does "
                                          "not match its config (quantize the model again).")
                tensor = f.get_tensor(key)
                want = expected[key]
                if tensor.shape != want.shape or tensor.dtype != want.dtype:
                    raise CheckpointError(f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}, but {QUANT_FILE} and "
                                          f"the config make it {want.dtype} {list(want.shape)}; the checkpoint does "
                                          "not match its config (quantize the model again).")
                loaded[key] = tensor
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); it is missing or truncated: quantize the model again.") \
            from e
    model.load_state_dict(loaded, strict=False, assign=True)
    if not meta.get("embeddings"):  # quantized embeddings are tied by sharing their module (empty_quantized)
        model.tie_weights()
    for key, source in meta.get("tied", {}).items():
        if key not in loaded and _tensor(model, key).is_meta:
            raise CheckpointError(f"{root}: {key} was stored as a tie of {source}, but this model does not tie them; "
                                  "quantize the model again.")
    missing = [k for k, t in model.state_dict().items() if t.is_meta]
    for key in missing:
        if any(key.startswith(name + ".") for name in [*meta["weights"], *meta.get("experts", {}),
                                                      *meta.get("embeddings", {})]):
            raise CheckpointError(f"{path} lacks {key}, a tensor of a quantized weight; the checkpoint is incomplete: "
                                  "quantize the model again.")
    return model, {"missing_keys": missing}


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, name = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def quantize_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, config: QuantConfig | None = None,
                        overwrite: bool = False) -> Path:
    """Quantize the model in `model_dir` once and write it to `out` (see `save_quantized`); every memfit command
    that takes --model then loads `out` quantized. The class is the one config.json names (any architecture)."""
    import transformers

    from memfit.local import from_pretrained, load_config, load_tokenizer
    from memfit.quant.model import quantize

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} already holds files; pass --overwrite to replace it, or choose another --out.")
    if is_quantized_dir(model_dir):
        raise CheckpointError(f"{model_dir} is already quantized; quantize the fp32 model it came from.")
    names = getattr(load_config(model_dir), "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    model = from_pretrained(cls or transformers.AutoModel, model_dir, dtype=torch.float32)
    quantize(model, config)
    try:
        tokenizer = load_tokenizer(model_dir)
    except CheckpointError:
        tokenizer = None  # a model without a tokenizer (rare) is still worth quantizing
    model.config._name_or_path = str(out.resolve())
    return save_quantized(model, out, tokenizer)
