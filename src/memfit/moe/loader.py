"""`memfit.moe.load`: a Hugging Face MoE checkpoint whose experts stay on disk behind a byte-budgeted cache.

The model is built on the meta device, so the full model never exists in memory. Every MoE layer's
`mlp.experts` is swapped for `OffloadedExperts`; the other weights (attention, norms, embeddings,
routers, shared experts, dense MLPs) are read from the checkpoint by key into memory. Everything that
can be wrong with the input is checked before the first non-expert weight is read: the architecture,
every expert tensor (present, right shape, inside its file), the budget, the predictor's model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from memfit.errors import ConfigError
from memfit.local import load_config, model_dir
from memfit.moe.arch import MoeArch, arch_for, expert_shape, moe_layers
from memfit.moe.experts import OffloadedExperts
from memfit.moe.policies import make_policy
from memfit.moe.predictors import Predictor, make_predictor
from memfit.moe.runtime import OffloadRuntime
from memfit.moe.store import ExpertStore
from memfit.quant.checkpoint import empty_quantized, is_quantized_dir, read_meta
from memfit.tiers.budget import format_size, parse_budget
from memfit.tiers.modules import empty_weights, load_resident
from memfit.tiers.st_reader import SafetensorsReader

DEFAULT_BUDGET = "25%"
DEFAULT_POLICY = "predictive"
DEFAULT_PREDICTOR = "cross-layer"
DEFAULT_IO_THREADS = 2


def load(checkpoint_dir: str | os.PathLike, expert_budget: int | str = DEFAULT_BUDGET, policy: str = DEFAULT_POLICY,
         predictor: str | os.PathLike | Predictor | None = DEFAULT_PREDICTOR, *, dtype: torch.dtype = torch.float32,
         drop_cache: bool = True, prefetch: bool = True, io_threads: int = DEFAULT_IO_THREADS) -> PreTrainedModel:
    """Load a MoE causal LM with its experts offloaded; the result works with `generate` and plain forwards.

    expert_budget: bytes of experts held in memory: a size ("3GB", "512MiB", an int) or a share of all
        expert bytes ("25%"). It must hold at least one layer's top-k experts.
    policy: "lru", "lfu", "score" (router-score aware) or "predictive" (needs a predictor).
    predictor: "cross-layer" (next layer's router on this layer's residual, training-free), the path of a
        routing-path predictor (`memfit moe train-predictor`), or None.
    dtype: compute dtype of the whole model (experts are converted while read if stored otherwise). A quantized
        checkpoint (`memfit quantize`) keeps its experts quantized in the cache: a slot holds one expert's codes
        and scales, dequantized tile by tile at compute.
    drop_cache: keep expert reads out of the page cache (O_DIRECT where the file system allows it, else
        buffered reads whose pages are dropped), so they really come from disk and memory use is what this
        process holds. Direct reads are also the faster and cheaper way to read a few MB cold.
    io_threads: prefetch reads in flight at once. Two keep the disk's queue busy while one request
        completes (measured on bench/moe.py's model, 25% budget, in periods when this VM's disk gave 0.55
        GB/s: strict hit ratio 0.89-0.90 with one, 0.91-0.94 with two; at 0.9 GB/s both 0.95-0.96).
    The handle `model.memfit_moe` has `stats`, `reset_stats()`, `memory()`, `describe()` and `close()`.
    """
    root = Path(checkpoint_dir)
    if io_threads < 1:
        raise ConfigError(f"io_threads must be >= 1 (prefetch reads in flight), got {io_threads}.")
    config = load_config(model_dir(root))
    arch = arch_for(config)
    quant = None
    if is_quantized_dir(root):  # `memfit quantize` output: quantized shells, experts read as codes and scales
        model = empty_quantized(AutoModelForCausalLM, root, config, dtype)
        quant = read_meta(root).get("experts") or None
    else:
        with empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = moe_layers(model)
    reader = SafetensorsReader(root, drop_cache=drop_cache, direct=drop_cache)
    try:
        store = expert_store(reader, arch, layers, dtype, root, quant)
        top_k = config.num_experts_per_tok
        slots = expert_slots(expert_budget, store, top_k)
        blocks = {l: layer for l, (_, layer) in layers.items()}
        fingerprint = store.fingerprint()
        chosen = make_predictor(predictor, blocks, arch, lambda: fingerprint)
        cache_policy = make_policy(policy, slots, store.num_experts)
        if cache_policy.needs_predictor and chosen is None:
            raise ConfigError(f"policy {policy!r} works from predictions; give a predictor ('cross-layer' or a trained "
                              "routing-path file), or choose lru, lfu or score.")
        acts = {l: layer.mlp.experts.act_fn for l, layer in blocks.items()}
        for layer in blocks.values():
            layer.mlp.experts = nn.Module()  # drops the meta expert tensors before the rest is loaded
        resident = load_resident(model, reader, keys_for=lambda names: (k for n in names for k in arch.disk_names(n)))
        model.requires_grad_(False)  # inference weights; MoE fine-tuning unfreezes what it trains
        runtime = OffloadRuntime(blocks, arch, store, slots, cache_policy, chosen, fingerprint, resident, prefetch,
                                 io_threads)
    except BaseException:
        reader.close()
        raise
    for l, layer in blocks.items():
        layer.mlp.experts = OffloadedExperts(runtime, l, store.num_experts, acts[l])
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
    model.memfit_moe = runtime
    return model.eval()


def expert_store(reader: SafetensorsReader, arch: MoeArch, layers: dict[int, tuple[str, nn.Module]], dtype: torch.dtype,
                 root: Path, quant: dict[str, dict] | None) -> ExpertStore:
    """The store of `layers`' experts (`moe_layers`), located from the checkpoint's headers (no expert is read)."""
    E, H, I = expert_shape(next(iter(layers.values()))[1].mlp.experts)
    return ExpertStore(reader, arch, {l: prefix for l, (prefix, _) in layers.items()}, E, H, I, dtype, root, quant)


def expert_slots(budget: int | str, store: ExpertStore, top_k: int) -> int:
    """How many experts `budget` holds; an error naming the minimum if fewer than one layer's top-k."""
    total = store.total_bytes
    nbytes = parse_budget(budget, total, "all expert bytes")
    slots = min(nbytes // store.expert_bytes, len(store.keys()))
    if slots < top_k:
        need = top_k * store.expert_bytes
        raise ConfigError(
            f"expert budget {format_size(nbytes)} holds {slots} expert(s) of {format_size(store.expert_bytes)}, but "
            f"one layer's top-{top_k} experts need at least {format_size(need)} ({need} bytes, "
            f"{100 * need / total:.2f}% of all expert bytes). Raise the budget to at least that."
        )
    return slots
