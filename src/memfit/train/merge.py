"""`merge_run`: a finished run as a plain Hugging Face checkpoint, with the adapter folded into the weights.

The result is what `AutoModel*.from_pretrained` loads with no missing or unexpected keys and memfit's logits: the
LoRA family folds B·A into W, DiffFit folds its scales into W and b, a STABLE-RPS model is decompressed to dense
weights; methods that cannot merge (Compacter's nonlinear bottleneck) are refused with the reason. Only the
architecture's own tensors are written (no `memfit_shared.*`, `idx_*` or `lora_*` keys), from a model built
fresh from the config, so transformers sees an ordinary checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from memfit import quant
from memfit.adapters import decompress, get_method, merge
from memfit.adapters.model import adapter_state_dict
from memfit.errors import ConfigError
from memfit.local import load_tokenizer
from memfit.tiers.files import replace_dir
from memfit.tiers.modules import empty_weights
from memfit.train.finetune import load_finetuned


def merged_model(run_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> nn.Module:
    """The run's model with its adapter folded in, as a plain transformers model of the base architecture."""
    # a quantized base merges in its original dtype; offloaded experts are read back into memory
    model = quant.dequantize(load_finetuned(run_dir, model_dir, offload_experts=False))
    method = get_method(model.memfit_config.method)
    own = set(adapter_state_dict(model)) - set(model.memfit_base_keys)  # tensors only the adapter has
    if method.from_scratch:
        decompress(model)
    elif method.merge_error:
        raise ConfigError(f"{run_dir}: method {method.name!r} cannot be merged into a plain checkpoint: "
                          f"{method.merge_error}")
    else:
        merge(model)
    state = model.state_dict()
    with empty_weights():
        clean = type(model)._from_config(model.config)
    keys = set(clean.state_dict())
    extra = sorted(k for k in state if k not in keys and k not in own)
    if extra:
        raise ConfigError(f"{run_dir}: the adapter added tensors the architecture does not have ({extra[:3]}, e.g. "
                          "DiffFit's add_bias on bias-free layers), so no plain checkpoint of this architecture holds "
                          "them. Train without add_bias to merge, or keep the adapter unmerged.")
    clean.load_state_dict({k: state[k].detach().clone() for k in keys if k in state}, strict=False, assign=True)
    clean.tie_weights()  # assign replaced tied tensors one by one: tie them again as the config says
    missing = sorted(n for n, t in [*clean.named_parameters(), *clean.named_buffers()] if t.is_meta)
    if missing:
        raise ConfigError(f"{run_dir}: the merged model lacks {missing[:3]}; the run does not match its base model.")
    return clean.eval()


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, model_dir: str | os.PathLike | None = None,
              overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write `merged_model(run_dir)` to `out` (safetensors, sharded above `max_shard_size`) with the base model's
    tokenizer, atomically; an existing non-empty `out` is replaced only with `overwrite`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already holds files; pass --overwrite to replace it, or choose another --out.")
    model = merged_model(run_dir, model_dir)
    tokenizer = load_tokenizer(model_dir or model.config._name_or_path)
    model.config._name_or_path = str(out.resolve())
    with replace_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out
