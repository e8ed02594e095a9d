"""Local model directories: memfit reads models from disk only and never reaches a model hub.

Every load of a config, tokenizer or model goes through here, so a missing or incomplete directory fails at once
with one line that says what is missing (instead of retrying a hub for a minute and then blaming the tokenizer),
and nothing is ever fetched over the network (`local_files_only=True` on every transformers call).
Weights must be safetensors: memfit never unpickles, so `pytorch_model.bin` checkpoints are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memfit.errors import CheckpointError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def model_dir(path: str | os.PathLike, weights: bool = True) -> Path:
    """`path` checked to be a local HF model directory (config.json, and safetensors weights if `weights`)."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"model directory {root} does not exist. Pass a local directory written by "
                              "save_pretrained (memfit never downloads models).")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a model directory. Pass the directory that holds "
                              "config.json and the weights.")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} is not a Hugging Face model directory: it has no config.json. Pass the "
                              "directory written by save_pretrained.")
    if weights and not (any((root / f).is_file() for f in SAFETENSORS) or any(root.glob("*.safetensors"))):
        if any((root / f).is_file() for f in PICKLED):
            raise CheckpointError(f"{root} holds its weights as pytorch_model.bin (pickle), which memfit never "
                                  "reads; convert them once with save_pretrained(safe_serialization=True).")
        raise CheckpointError(f"{root} has config.json but no weights (model.safetensors, or shards with "
                              "model.safetensors.index.json). Copy the weights there, or pass the directory that "
                              "has them.")
    return root


def load_config(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The model's `AutoConfig` (kwargs as for from_pretrained, e.g. num_labels)."""
    from transformers import AutoConfig

    root = model_dir(path, weights=False)
    try:
        return AutoConfig.from_pretrained(str(root), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{root}/config.json cannot be read as a transformers config ({e}). Re-save the "
                              "model, or use a transformers version that knows its model_type.") from e


def from_pretrained(cls: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, ...)` on a checked local directory, without the hub."""
    root = model_dir(path)
    try:
        return cls.from_pretrained(str(root.resolve()), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {root} ({e}). Re-save or re-copy it.") from e


def load_tokenizer(path: str | os.PathLike, padding_side: str | None = None) -> Any:
    """The model's tokenizer, with a pad token: its own, else EOS, else UNK (the padded positions are masked, so
    any existing token serves; adding one would change the vocabulary the model was trained with)."""
    from transformers import AutoTokenizer

    root = model_dir(path, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {root} ({e}). The model directory needs "
                              "tokenizer.json (or a slow tokenizer's files) beside config.json: save one there with "
                              "tokenizer.save_pretrained.") from e
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CheckpointError(f"the tokenizer in {root} has no pad, EOS or UNK token to pad batches with; set "
                                  "pad_token in its tokenizer_config.json.")
        tokenizer.pad_token = fallback
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer
