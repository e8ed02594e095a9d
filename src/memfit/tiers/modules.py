"""Models without their weights: build on the meta device, fill from a checkpoint by key, move to a device.

gpt-fast's pattern: the module tree is built with no memory behind its parameters, then each tensor is read
straight into place from the checkpoint. Streaming (frozen decoder layers) and offloaded MoE (experts) both
start this way and differ only in what they leave out and how a parameter's name maps to a checkpoint key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from memfit.errors import CheckpointError, ConfigError
from memfit.tiers.st_reader import SafetensorsReader

KeysFor = Callable[[list[str]], Iterable[str]]  # a tensor's names in the model -> candidate checkpoint keys


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) and buffers on the CPU.

    Buffers stay real because many are computed at construction and are not in checkpoints
    (rotary `inv_freq`); `load_resident` then loads the parameters from the checkpoint.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # already-meta parameters are ties: keep them shared
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks of a model: the ModuleList of >= 2 same-class modules with the most parameters.

    Generic on purpose (HF `model.layers`, GPT-2 `transformer.h`, BERT `encoder.layer`, ...), so no
    architecture needs an entry in a table.
    """
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ConfigError("found no nn.ModuleList of repeated blocks to stream; streaming needs a model whose "
                          "layers are held in an nn.ModuleList (as every HF decoder is).")
    return best


def vocabulary(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, output head) of a transformers model, None where it has none. transformers signals a
    model without input embeddings (a vision or speech backbone) by raising NotImplementedError from the
    accessor, and answers None for a missing head."""
    try:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # transformers' "no input embeddings", not a stub
        embedding = None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return embedding, head


def param_aliases(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    """Every parameter with all the names it has (tied weights have several)."""
    names: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    return names


def suffix_keys(names: list[str]) -> Iterator[str]:
    """Checkpoint keys a parameter may be stored under: each name, then its suffixes (a model wrapped in another,
    e.g. a head model around the base), then `model.` + name (a base model loaded from a head checkpoint)."""
    for name in names:
        parts = name.split(".")
        for start in range(len(parts) - 1):
            yield ".".join(parts[start:])
        yield "model." + name


def checkpoint_key(names: list[str], reader: SafetensorsReader, keys_for: KeysFor = suffix_keys) -> str | None:
    """The first candidate key of `names` that the checkpoint holds, or None."""
    return next((k for k in keys_for(names) if k in reader), None)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    owner, _, attr = name.rpartition(".")
    getattr(model.get_submodule(owner), kind)[attr] = value


def load_resident(model: nn.Module, reader: SafetensorsReader, skip: Iterable[torch.Tensor] = (), *,
                  keys_for: KeysFor = suffix_keys, device: torch.device | str = "cpu") -> int:
    """Read every parameter and stored buffer of `model` not in `skip` from the checkpoint; returns their bytes.

    A tensor on the meta device must be in the checkpoint (else CheckpointError); a real one the checkpoint lacks
    keeps its value (a fresh head, an adapter). Trainable real parameters are never overwritten. Every alias of a
    tied weight gets the same new Parameter, so ties survive. Shapes are checked against the model's.
    """
    total = 0
    skip = {id(t) for t in skip}
    for p, names in param_aliases(model).items():
        if id(p) in skip or (p.requires_grad and not p.is_meta):
            continue
        key = checkpoint_key(names, reader, keys_for)
        if key is None:
            if p.is_meta:
                raise CheckpointError(f"the checkpoint has no tensor for {names[0]!r} (looked for "
                                      f"{list(keys_for(names))[:4]}); is it a complete checkpoint of this model?")
            continue
        loaded = nn.Parameter(_read(reader, key, p, device), requires_grad=p.requires_grad)
        total += loaded.numel() * loaded.element_size()
        for name in names:
            _set_tensor(model, name, loaded, "_parameters")
    for name, b in list(model.named_buffers()):
        if id(b) in skip:
            continue
        key = checkpoint_key([name], reader, keys_for)
        if key is not None:
            b = _read(reader, key, b, device)
            _set_tensor(model, name, b, "_buffers")
        elif b.is_meta:
            raise CheckpointError(f"the checkpoint has no tensor for buffer {name!r}; build the model inside "
                                  "memfit.tiers.modules.empty_weights(), which keeps buffers real.")
        total += b.numel() * b.element_size()
    return total


def _read(reader: SafetensorsReader, key: str, like: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    info = reader.info(key)
    if info.shape != tuple(like.shape):
        raise CheckpointError(f"tensor {key!r} in {info.path} has shape {list(info.shape)}; the model expects "
                              f"{list(like.shape)}. config.json and the weights disagree.")
    return reader.read(key).to(device, like.dtype)


@torch.no_grad()
def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move every parameter and buffer of `model` to `device` in place, tied weights staying tied.

    `module.to()` would do the same for a plain model; this one also serves models whose streamed parameters are
    swapped in and out of `_parameters` (the swap installs tensors on the handle's device; the placeholders and
    everything resident move here), and it is the one place that must not forget buffers (BERT's `position_ids`
    indexing a CUDA embedding from the CPU).
    """
    device = torch.device(device)
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device == device:
                    continue
                if id(t) not in moved:
                    data = t.data.to(device)
                    moved[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(
                        t, nn.Parameter) else data
                table[name] = moved[id(t)]
    return model
