"""Exact export to, and import from, the HF PEFT LoRA format (which PEFT and vLLM load).

Any adapter whose layers expose `lora_factors()` -> (A [r, in], B [out, r], scale) exports: PEFT
computes ΔW = (lora_alpha / r)·B·A, so each module is written at its own rank with
lora_alpha = scale·r, and ranks or alphas that differ from the most common one go to
`rank_pattern` / `alpha_pattern` keyed by the full module path.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from memfit.adapters.io import load_adapter_tensors
from memfit.adapters.lora import LoraConfig
from memfit.adapters.model import adapter_modules, inject
from memfit.adapters.targets import saved_modules
from memfit.errors import ConfigError
from memfit.tiers.files import atomic_write_json, load_tensors, read_json, save_tensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _task_type(model: nn.Module) -> str | None:
    arch = (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if arch.endswith(suffix) or type(model).__name__.endswith(suffix):
            return task
    return None


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


@torch.no_grad()
def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model`'s LoRA-family adapter in the PEFT LoRA format. Rank-0 modules are left out."""
    directory = Path(directory)
    config = getattr(model, "memfit_config", None)
    if config is None:
        raise ConfigError("this model has no memfit adapter; nothing to export.")
    modules = list(adapter_modules(model))
    if not modules or not all(hasattr(m, "lora_factors") for _, m in modules):
        raise ConfigError(f"method {config.method!r} is not a B·A adapter; it cannot be exported as PEFT LoRA.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, module in modules:
        a, b, scale = module.lora_factors()
        if a.shape[0] == 0:
            continue
        ranks[name], alphas[name] = a.shape[0], float(scale) * a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float()
    if not ranks:
        raise ConfigError("every adapted module has rank 0; there is nothing to export.")
    saved = saved_modules(model, model.memfit_config.modules_to_save)
    for key, value in model.state_dict().items():
        if any(key.startswith(n + ".") for n in saved):
            tensors[PREFIX + key] = value
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    kinds = {n.split(".")[-1] for n in ranks}
    # A kind name is a safe PEFT target only if every module of the model with that name is exported (BERT's
    # pooler is also a "dense"; rank-0 modules are left out).
    all_of_kind = all(
        {n for n in ranks if n.split(".")[-1] == k} == {n for n, _ in model.named_modules() if n.split(".")[-1] == k}
        for k in kinds
    )
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(config, "dropout", 0.0)),
        "target_modules": sorted(kinds) if all_of_kind else sorted(ranks),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    save_tensors(directory / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_json(directory / PEFT_CONFIG, peft_config)
    return directory


def peft_config(directory: str | os.PathLike) -> LoraConfig:
    """The memfit LoraConfig equivalent to the PEFT LoRA adapter in `directory`."""
    directory = Path(directory)
    cfg = read_json(directory / PEFT_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{directory} holds a {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} PEFT "
                          "adapter; only LORA imports.")
    for flag in ("use_dora", "fan_in_fan_out", "use_rslora"):
        if cfg.get(flag):
            raise ConfigError(f"{directory}: PEFT option {flag}=True is not supported by memfit LoRA.")
    return LoraConfig(
        target_modules=cfg["target_modules"], r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)), rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}), modules_to_save=list(cfg.get("modules_to_save") or []),
    )


def load_peft_tensors(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy a PEFT LoRA adapter's tensors into `model`, which carries the adapter of `peft_config(directory)`."""
    directory = Path(directory)
    state = {}
    for key, value in load_tensors(directory / PEFT_WEIGHTS).items():
        key = key.removeprefix(PREFIX)
        key = key.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        key = key.replace(".modules_to_save.default.", ".")
        state[key] = value
    load_adapter_tensors(model, state, source=str(directory))
    return model


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into `model` as memfit LoRA (same logits as PEFT)."""
    return load_peft_tensors(inject(model, peft_config(directory)), directory)
