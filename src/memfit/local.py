"""Local models: memfit reads models from disk only and never reaches a model hub.

Every load of a config, tokenizer or model goes through here, so a missing or incomplete directory fails at once
with one line that says what is missing (instead of retrying a hub for a minute and then blaming the tokenizer),
and nothing is ever fetched over the network (`local_files_only=True` on every transformers call).
Weights must be safetensors: memfit never unpickles, so `pytorch_model.bin` checkpoints are refused.

A model is a Hugging Face directory, or a single `.gguf` file (llama.cpp's format, with its tokenizer and chat
template inside), which transformers dequantizes to fp32 at every load; `convert_gguf` writes it once as an HF
directory, which loads faster and can be streamed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memfit.errors import CheckpointError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _gguf_args(path: Path) -> tuple[str, dict[str, Any]]:
    """(directory, kwargs) transformers loads a GGUF file with."""
    return str(path.resolve().parent), {"gguf_file": path.name}


def model_dir(path: str | os.PathLike, weights: bool = True) -> Path:
    """`path` checked to be a local HF model directory (config.json, and safetensors weights if `weights`), or a
    .gguf file."""
    root = Path(path)
    if is_gguf(root):
        if not root.is_file():
            raise CheckpointError(f"GGUF file {root} does not exist. Pass a local .gguf file or a model directory.")
        return root
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
    where, extra = _gguf_args(root) if is_gguf(root) else (str(root), {})
    try:
        return AutoConfig.from_pretrained(where, local_files_only=True, **extra, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{root}/config.json cannot be read as a transformers config ({e}). Re-save the "
                              "model, or use a transformers version that knows its model_type.") from e


def from_pretrained(cls: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, ...)` on a checked local directory or GGUF file, without the hub. A GGUF model
    comes back dequantized, as a plain model (no quantization config), named by its file."""
    root = model_dir(path)
    if not is_gguf(root) and (root / "memfit_quant.json").is_file():  # written by `memfit quantize`
        import torch

        from memfit.quant.checkpoint import load_quantized

        info = kwargs.pop("output_loading_info", False)
        dtype = kwargs.pop("dtype", None) or torch.float32
        model, loading = load_quantized(cls, root, load_config(root, **kwargs), dtype=dtype)
        model.config._name_or_path = str(root.resolve())
        return (model, loading) if info else model
    where, extra = _gguf_args(root) if is_gguf(root) else (str(root.resolve()), {})
    try:
        with quiet_transformers():  # its progress bars and load report (a fresh head is expected, and trained)
            loaded = cls.from_pretrained(where, local_files_only=True, **extra, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {root} ({e}). Re-save or re-copy it.") from e
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if is_gguf(root):
        model.config.__dict__.pop("quantization_config", None)  # fp32 now: nothing is quantized any more
        model.config._name_or_path = str(root.resolve())  # where a run finds its base model again
    return loaded


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike, padding_side: str | None = None) -> Any:
    """The model's tokenizer, with a pad token: its own, else EOS, else UNK (the padded positions are masked, so
    any existing token serves; adding one would change the vocabulary the model was trained with)."""
    from transformers import AutoTokenizer

    root = model_dir(path, weights=False)
    where, extra = _gguf_args(root) if is_gguf(root) else (str(root), {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
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


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the GGUF model at `path` as a Hugging Face directory (fp32 safetensors, config, tokenizer with its chat
    template) at `out`, atomically: loading it afterwards skips the dequantization and allows streaming."""
    import torch
    from transformers import AutoModelForCausalLM

    from memfit.tiers.files import replace_dir

    source = model_dir(path)
    if not is_gguf(source):
        raise CheckpointError(f"{source} is not a .gguf file; convert takes the file llama.cpp (or a GGUF package) "
                              "ships.")
    model = from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    # save_pretrained refuses a model that was loaded from GGUF: save the same weights from a model built fresh.
    clean = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.config._name_or_path = str(Path(out).resolve())
    with replace_dir(out) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)
