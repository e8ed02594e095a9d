"""Everything `memfit generate` and `memfit serve` run on: the model (in memory, streamed under a weights budget,
or an MoE model with offloaded experts), its tokenizer, the adapter slots and the engine.

Adapters are served side by side from stacked slots (`memfit.adapters.multi`), so the base weights stay untouched
whatever the adapters; a model fine-tuned with a method that cannot run that way (Compacter, or a run that trained a
head) is merged first (`memfit merge`) and served as a model of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit import quant
from memfit.adapters.multi import lora_factors, wrap_for_slots
from memfit.errors import ConfigError
from memfit.fields import option
from memfit.local import from_pretrained, is_gguf, load_config, load_tokenizer, model_dir
from memfit.serve.adapters import AdapterCache
from memfit.serve.engine import Engine
from memfit.serve.metrics import Metrics
from memfit.tiers.memory import lean_allocator, release_checkpoint_map, storage_bytes
from memfit.tiers.modules import empty_weights

DEFAULT_RANK = 16  # slot rank when no adapter is given at start (vLLM's default --max-lora-rank)


ADAPTERS, MEMORY, BATCHING = "Adapters", "Memory", "Batching"


@dataclass
class ServeConfig:
    """How to run a model for `memfit generate` and `memfit serve` (the CLI's flags come from these fields)."""

    adapters: dict[str, str] | None = option(None, help="adapters to serve: name -> directory (memfit runs or PEFT "
                                             "LoRA folders)")
    adapter_dir: str | None = option(None, help="A folder whose subfolders are adapters, each loaded on first use "
                                     "by its name.", panel=ADAPTERS)
    max_loras: int = option(4, help="Adapters held in device slots at once (the batch mixes them freely).",
                            panel=ADAPTERS)
    max_cpu_loras: int = option(16, help="More adapters kept in host memory; the rest are read from disk on demand "
                                "(LRU at each tier).", panel=ADAPTERS)
    max_lora_rank: int | None = option(None, help=f"Rank of the slots (default: the largest rank of the adapters given "
                                       f"at start, at least {DEFAULT_RANK}).", panel=ADAPTERS)
    max_seqs: int = option(16, help="Most requests in the running batch.", panel=BATCHING)
    kv_budget: int = option(8192, help="KV-cache tokens of the running batch (rows x the longest prompt + max "
                            "tokens); requests beyond it wait.", panel=BATCHING)
    weights_budget: str | None = option(None, help="Dense models: keep at most this much of the weights in memory "
                                        "('2GB', '25%'), streaming the other layers from disk each step.",
                                        panel=MEMORY)
    quantize: str | None = option(None, help="Quantize the weights as they load: 'nf4' (0.13x fp32) or 'int8' "
                                  "(0.25x); a checkpoint written by `memfit quantize` loads quantized without it.",
                                  panel=MEMORY)
    expert_budget: str | None = option(None, help="MoE models: run through memfit.moe with this expert cache "
                                       "('25%', '3GB').", panel=MEMORY)
    lean_allocator: bool = option(False, help="CPU on Linux: glibc returns every freed block above 256 KB at once, "
                                  "so the peak is what `memfit plan --for generate|serve` predicts (prefills' "
                                  "activations otherwise stay in the heap).", panel=MEMORY)
    device: str | None = option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    serve_adapters: bool = option(True, help="wrap the model for adapter slots (False: the base model alone)")
    any_module: bool = option(False, help="give every Linear an adapter slot (adapters may arrive at run time); else "
                              "only the modules the adapters given at start adapt")

    def __post_init__(self) -> None:
        if self.expert_budget is not None and self.weights_budget is not None:
            raise ConfigError("--expert-budget does not combine with --weights-budget: the non-expert weights stay "
                              "resident and the experts are the offloaded part; drop one of them.")


def _load_model(path: Path, config: ServeConfig, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if config.quantize is not None:
        if config.quantize not in quant.CODEBOOKS:
            raise ConfigError(f"--quantize must be one of {', '.join(sorted(quant.CODEBOOKS))}, got "
                              f"{config.quantize!r}.")
        for flag, value in (("--weights-budget", config.weights_budget), ("--expert-budget", config.expert_budget)):
            if value is not None:
                raise ConfigError(f"--quantize does not combine with {flag} (weights are read per use in their "
                                  "stored dtype); write the quantized checkpoint once (memfit quantize --model M "
                                  "--out DIR) and pass DIR as --model.")
        model = from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32)
        quant.quantize(model, quant.QuantConfig(kind=config.quantize))
        release_checkpoint_map(model)
        return model.to(device)

    if config.expert_budget is not None:
        import memfit.moe as moe

        if is_gguf(path):
            raise ConfigError("offloaded MoE reads experts from safetensors; convert the GGUF file first "
                              "(memfit convert --gguf FILE --out DIR).")
        return moe.load(path, config.expert_budget)
    if config.weights_budget is None:
        model = from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32)
        release_checkpoint_map(model)  # experts fused as they loaded
        return model.to(device)
    if is_gguf(path):
        raise ConfigError(f"{path} is a GGUF file, which cannot be streamed; convert it once with `memfit convert "
                          f"--gguf {path} --out DIR` and stream DIR.")
    from memfit.quant.checkpoint import empty_quantized, is_quantized_dir
    from memfit.tiers.stream import stream_weights

    if is_quantized_dir(path):  # streams the quantized bytes
        model = empty_quantized(AutoModelForCausalLM, path, load_config(path))
    else:
        with empty_weights():
            model = AutoModelForCausalLM.from_config(load_config(path), dtype=torch.float32)
    stream_weights(model, path, config.weights_budget, device=device)
    return model


def _skeleton(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with empty_weights():
        return AutoModelForCausalLM.from_config(load_config(path), dtype=torch.float32)


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def serve_device(config: ServeConfig, device: str | None = None) -> torch.device:
    """The device the model runs on: the CPU for offloaded experts, whatever --device says (`memfit.moe.load` keeps
    the model and its cache in host RAM), else `device`, --device, or cuda where there is one."""
    if config.expert_budget is not None:
        return torch.device("cpu")
    return torch.device(device or config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_engine(model_path: str | os.PathLike, config: ServeConfig, model: nn.Module | None = None,
                 tokenizer: Any = None) -> tuple[Engine, Any, str]:
    """(engine, tokenizer, the base model's name) for `model_path` under `config`; adapters given are read now, so
    a bad one fails at start with its name and the reason. model: the base model as `config` would load it, built
    already (`memfit plan` passes one of fake tensors); tokenizer: the model's, loaded already."""
    path = model_dir(model_path)
    device = serve_device(config)
    if config.lean_allocator and device.type == "cpu" and model is None:
        lean_allocator()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    skeleton = _skeleton(path) if config.serve_adapters else None
    factors = {name: lora_factors(d, skeleton) for name, d in (config.adapters or {}).items()}
    rank = config.max_lora_rank or max([DEFAULT_RANK, *(a.shape[0] for f in factors.values()
                                                         for a, _, _ in f.values())])
    model = _load_model(path, config, device) if model is None else model
    metrics = Metrics()
    adapters = rows = None
    if config.serve_adapters:
        # Slots only where the adapters act, unless others may come later: a slot costs memory and a check per step.
        modules = None if config.any_module or config.adapter_dir or not factors else sorted(
            {m for f in factors.values() for m in f})
        rows, wrapped = wrap_for_slots(model, config.max_loras, rank, modules)
        adapters = AdapterCache(wrapped, skeleton, config.max_loras, config.max_cpu_loras, metrics)
        for name, directory in (config.adapters or {}).items():
            adapters.add(name, directory, factors=factors[name])
    engine = Engine(model, eos_ids(model, tokenizer), adapters, rows, config.max_seqs, config.kv_budget, metrics)
    name = path.stem if is_gguf(path) else path.name
    return engine, tokenizer, name


def engine_memory(engine: Engine) -> dict[str, int]:
    """Bytes of what the engine holds, by `memfit plan`'s component names: the base's weights (each storage once:
    tied weights share one), the adapter slots, the adapters kept in host memory and an MoE's expert cache."""
    every = storage_bytes([*engine.model.parameters(), *engine.model.buffers()])
    experts = getattr(engine.model, "memfit_moe", None)
    cache = {"expert cache": experts.cache.nbytes} if experts is not None else {}
    if engine.adapters is None:
        return {"weights resident": every, **cache}
    slots = storage_bytes([t for layer in engine.adapters.wrapped.values()
                           for t in (layer.lora_A, layer.lora_B, layer.scale)])
    return {"weights resident": every - slots, "adapter slots": slots,
            "adapters in host memory": engine.adapters.host_bytes(), **cache}
