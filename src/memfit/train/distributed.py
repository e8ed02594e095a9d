"""Scale-out on PyTorch's own engine: FSDP2 `fully_shard` under torchrun, checkpoints that never unpickle.

Nothing here moves tensors between ranks by hand: FSDP2 all-gathers parameters before each layer and
reduce-scatters (averages) gradients after it; each rank writes and reads only its own shards.

Shard modes (ZeRO stages):
    grad  reshard_after_forward=False: parameters stay gathered from forward to backward, gradients
          and optimizer states are sharded (ZeRO-2; one all-gather per layer per step).
    full  reshard_after_forward=True: parameters are freed after each layer's forward and gathered
          again in backward (ZeRO-3; least memory, one more all-gather per layer).

Frozen base weights and trainable adapters share each layer's FSDP unit: FSDP2 shards both, gathers
both, and reduce-scatters only the gradients that exist (frozen parameters get none).

Checkpoints hold only what training changes (trainable parameters and optimizer state); the base weights
come from the base model again at resume. They are safetensors + JSON, one pair per rank, keyed by
parameter name (not torch.distributed.checkpoint, whose `.metadata` is a pickle: a crafted checkpoint would
run code on resume). The price is that a checkpoint resumes only on the same number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from memfit.errors import CheckpointError, ConfigError
from memfit.optim.adamw8bit import local
from memfit.tiers.files import atomic_write_json, fsync_dir, load_tensors, read_json, save_tensors
from memfit.tiers.modules import find_layers

SHARD_MODES = {"grad": False, "full": True}  # mode -> reshard_after_forward
META_NAME = "memfit_meta.json"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or compatible) launch: the environment names its rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment: NCCL on GPUs, gloo on CPUs."""
    if not launched_by_torchrun():
        raise ConfigError("no torchrun environment (RANK, WORLD_SIZE): launch with "
                          "`torchrun --nproc-per-node N -m memfit.cli finetune ...` to shard.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda and backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def teardown_distributed() -> None:
    """Leave the process group together: every rank waits for the others, then the group is destroyed, so no rank
    exits while a peer's collectives are still being torn down (gloo aborts the process then)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int | str | None = 0) -> None:
    """End a torchrun worker whose process group is torn down, skipping interpreter finalization: there, gloo's
    threads are destroyed still joinable in up to half of CPU runs ("terminate called without an active exception",
    SIGABRT), which fails a run that finished and wrote everything. Output is flushed first; nothing else runs at
    exit in memfit (checkpoints and exports are already written and renamed atomically)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shard_model(model: nn.Module, mode: str = "full", cpu_offload: bool = False) -> nn.Module:
    """Wrap each repeated block, then the root, with `fully_shard`, in place; call after adapter injection.

    cpu_offload: keep the parameter and gradient shards (and so the optimizer step) in CPU memory,
        copying each layer to the GPU for its compute (FSDP2's CPUOffloadPolicy; pinned on CUDA).
    """
    if mode not in SHARD_MODES:
        raise ConfigError(f"unknown shard mode {mode!r}; choose 'grad' (ZeRO-2) or 'full' (ZeRO-3).")
    if getattr(model, "memfit_stream", None) is not None:
        raise ConfigError("a model that streams its weights cannot also be sharded: FSDP2 already divides the "
                          "frozen weights across ranks. Drop --weights-budget or --shard.")
    if not dist.is_initialized():
        raise ConfigError("sharding needs a process group: call memfit.train.distributed.init_distributed() "
                          "under torchrun first.")
    pin = torch.cuda.is_available()
    offload = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
    reshard = SHARD_MODES[mode]
    _, layers = find_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, reshard_after_forward=reshard, offload_policy=offload)
    return model


OPTIM_DIR = "optimizer"  # where an optimizer with its own durable format (OffloadAdamW) writes it
FORMAT = "memfit-sharded-1"


def _rank_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rank{rank}-train.json", directory / f"rank{rank}-train.safetensors"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _agree(error: BaseException | None, doing: str) -> None:
    """Raise on every rank if any rank failed `doing`: a rank that carried on alone would hang in the next
    collective waiting for the one that failed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(failed)
        if error is None and failed.item():
            raise CheckpointError(f"{int(failed.item())} other rank(s) failed {doing}; see their error.")
    if error is not None:
        raise error


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _layout(t: torch.Tensor) -> dict[str, Any]:
    """How a DTensor's local shard sits in the whole: enough to rebuild it with DTensor.from_local."""
    return {"shape": list(t.shape), "stride": list(t.stride()), "placements": [str(p) for p in t.placements],
            "mesh": list(t.device_mesh.shape)}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model's name of every optimizer parameter, by group: checkpoints key state by name, not position."""
    names = {id(p): n for n, p in model.named_parameters()}
    if any(id(p) not in names for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("the optimizer holds parameters that are not the model's (after sharding): build it "
                          "from model.named_parameters() once shard_model() has run.")
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _json_value(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot checkpoint {what} = {value!r}: it is neither a tensor nor JSON ({e}).") from e
    return value


def _rank_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's local tensors (trainable parameters, optimizer state) by name, and the JSON that describes them."""
    rank, world = _rank_world()
    tensors: dict[str, torch.Tensor] = {}
    dtensors: dict[str, Any] = {}

    def add(key: str, t: torch.Tensor) -> None:
        if hasattr(t, "to_local"):
            dtensors[key] = _layout(t)
        tensors[key] = local(t).detach()

    for name, p in model.named_parameters():
        if p.requires_grad:
            add(f"param.{name}", p)
    info: dict[str, Any] = {"format": FORMAT, "rank": rank, "world_size": world, "optimizer": type(optimizer).__name__}
    group_names = _param_names(model, optimizer)
    if hasattr(optimizer, "save_checkpoint") and hasattr(optimizer, "load_checkpoint"):
        info["optimizer_dir"] = OPTIM_DIR  # its own checksummed files, written beside (one subdir per rank)
    else:
        sd = optimizer.state_dict()
        flat = [n for names in group_names for n in names]
        state: dict[str, Any] = {}
        for index, values in sd["state"].items():
            name, entry = flat[index], {"tensors": [], "scalars": {}}
            for key, value in values.items():
                if not isinstance(key, str):
                    raise CheckpointError(f"cannot checkpoint optimizer state key {key!r} of {name!r}: not a string.")
                if isinstance(value, torch.Tensor):
                    add(f"state.{name}.{key}", value)
                    entry["tensors"].append(key)
                else:
                    entry["scalars"][key] = _json_value(value, f"optimizer state {name}.{key}")
            state[name] = entry
        groups = []
        for g, names in zip(sd["param_groups"], group_names, strict=True):
            hyper = {k: _json_value(v, f"param group field {k!r}") for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": names})
        info |= {"param_groups": groups, "state": state}
    info["tensors"] = {k: {"shape": list(t.shape), "dtype": _dtype_name(t)} for k, t in tensors.items()}
    info["dtensors"] = dtensors
    return tensors, info


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write trainable parameters + optimizer state, each rank its own local shards, then `meta` as JSON.

    Rank r writes `rank{r}-train.safetensors` (keys `param.<name>`, `state.<name>.<key>`) and
    `rank{r}-train.json` (world size, shapes, dtypes, DTensor layouts, non-tensor state, param groups): no
    pickle anywhere, so resuming from an untrusted checkpoint cannot run code. Frozen parameters are left out.
    An optimizer with its own durable format (OffloadAdamW) writes it under `optimizer/`.

    write_extra(dir): every rank may add its own files (e.g. its RNG state) before the checkpoint commits.

    Written into `<path>.partial` and renamed by rank 0 once every rank is done, so a crash mid-write
    leaves the previous checkpoint intact.
    """
    path = Path(path)
    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    rank, _ = _rank_world()
    if is_main_process() and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    error: BaseException | None = None
    try:
        tensors, info = _rank_state(model, optimizer)
        json_file, tensor_file = _rank_files(partial, rank)
        save_tensors(tensor_file, tensors)
        if "optimizer_dir" in info:
            optimizer.save_checkpoint(partial / OPTIM_DIR)
        atomic_write_json(json_file, info)
        if write_extra is not None:
            write_extra(partial)
    except OSError as e:  # CheckpointError is one
        error = e if isinstance(e, CheckpointError) else CheckpointError(
            f"writing the checkpoint {path} failed: {e}. The previous one is kept; free disk space or choose "
            "another directory.")
    except Exception as e:  # noqa: BLE001 (raised below, once the other ranks know)
        error = e
    _agree(error, f"writing the checkpoint {path} (the previous one is kept)")
    if is_main_process():
        try:
            atomic_write_json(partial / META_NAME, meta or {})
            shutil.rmtree(old, ignore_errors=True)  # left by a save cut between the renames below
            if path.exists():
                path.rename(old)
            partial.rename(path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = e if isinstance(e, CheckpointError) else CheckpointError(f"committing the checkpoint {path} "
                                                                             f"failed: {e}.")
    _agree(error, f"committing the checkpoint {path}")
    return path


def _check(ok: bool, file: Path, message: str) -> None:
    if not ok:
        raise CheckpointError(f"{file}: {message}")


def _check_layout(file: Path, key: str, layouts: dict, p: torch.Tensor) -> None:
    """A DTensor in the files must belong to a parameter sharded the same way (placements, mesh)."""
    if key not in layouts:
        return
    _check(hasattr(p, "to_local"), file, f"{key!r} was sharded (a DTensor) but its parameter is not; shard the "
           "model as the run did.")
    saved = {k: layouts[key][k] for k in ("placements", "mesh")}
    here = {k: _layout(p)[k] for k in ("placements", "mesh")}
    _check(saved == here, file, f"{key!r} was sharded as {saved}, the parameter is {here}; shard as the run did.")


def _read_rank(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's JSON and tensors, checked against its shards of the model and the optimizer."""
    rank, world = _rank_world()
    json_file, tensor_file = _rank_files(path, rank)
    if not json_file.is_file() and (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is a torch.distributed.checkpoint directory (older memfit): its .metadata "
                              "is a pickle, which memfit never loads. Start the run again without --resume.")
    info = read_json(json_file)
    try:
        _check(isinstance(info, dict) and info.get("format") == FORMAT, json_file,
               f"not a memfit sharded checkpoint (format {FORMAT!r} expected).")
        _check(info["world_size"] == world, json_file, f"written by {info['world_size']} rank(s), this run has "
               f"{world}; resume with the same number of processes.")
        _check(info["rank"] == rank, json_file, f"holds rank {info['rank']}'s shards, not rank {rank}'s.")
        _check(info["optimizer"] == type(optimizer).__name__, json_file, f"holds {info['optimizer']} state, this "
               f"optimizer is {type(optimizer).__name__}; resume with the same --optim.")
        records, layouts = info["tensors"], info["dtensors"]
        tensors = load_tensors(tensor_file)
        for key in sorted(set(tensors) - set(records)):
            _check(False, tensor_file, f"tensor {key!r} is not listed in {json_file.name}.")
        for key, rec in records.items():
            _check(key in tensors, tensor_file, f"tensor {key!r} is missing.")
            t = tensors[key]
            _check(list(t.shape) == rec["shape"] and _dtype_name(t) == rec["dtype"], tensor_file, f"tensor {key!r} "
                   f"is {_dtype_name(t)} {list(t.shape)}, {json_file.name} says {rec['dtype']} {rec['shape']}.")
        params = dict(model.named_parameters())
        trainable = {f"param.{n}" for n, p in params.items() if p.requires_grad}
        saved = {k for k in records if k.startswith("param.")}
        for key in sorted(saved ^ trainable):
            why = "missing" if key in trainable else "not a trainable parameter of this model"
            _check(False, tensor_file, f"parameter {key[6:]!r} is {why}; load into the model the run trained "
                   "(same adapters).")
        for key in sorted(saved):
            w, t = local(params[key[6:]]), tensors[key]
            _check(w.shape == t.shape and w.dtype == t.dtype, tensor_file, f"{key!r} is {_dtype_name(t)} "
                   f"{list(t.shape)}, the model's local shard {_dtype_name(w)} {list(w.shape)}; load into the model "
                   "the run trained (same adapters, dtype and sharding).")
            _check_layout(tensor_file, key, layouts, params[key[6:]])
        expected = set(saved)
        own = hasattr(optimizer, "save_checkpoint") and hasattr(optimizer, "load_checkpoint")
        _check(("optimizer_dir" in info) == own, json_file, "the optimizer state is not in the format this "
               "optimizer reads; resume with the same --optim.")
        if not own:
            _check([g["params"] for g in info["param_groups"]] == _param_names(model, optimizer), json_file,
                   "the optimizer's parameters (by group) differ from the checkpoint's; build it as the run did.")
            for name, entry in info["state"].items():
                _check(name in params, json_file, f"optimizer state for {name!r}, which is not a parameter.")
                for key in entry["tensors"]:
                    _check(f"state.{name}.{key}" in records, json_file, f"state tensor {name}.{key} is not listed.")
                    _check_layout(tensor_file, f"state.{name}.{key}", layouts, params[name])
                    expected.add(f"state.{name}.{key}")
        for key in sorted(set(records) - expected):
            _check(False, json_file, f"tensor {key!r} belongs to no parameter or optimizer state.")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{json_file} is malformed ({type(e).__name__}: {e}); save the checkpoint again.") from e
    return info, tensors


def _optimizer_state(info: dict, tensors: dict[str, torch.Tensor], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A torch `state_dict()` for `optimizer` from the files: positions from names, DTensors from local shards."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    index = {n: i for i, n in enumerate(n for names in _param_names(model, optimizer) for n in names)}
    state: dict[int, dict[str, Any]] = {}
    for name, entry in info["state"].items():
        p, values = params[name], dict(entry["scalars"])
        for key in entry["tensors"]:
            t, layout = tensors[f"state.{name}.{key}"], info["dtensors"].get(f"state.{name}.{key}")
            if layout is not None:
                t = DTensor.from_local(t.to(local(p).device), p.device_mesh, p.placements, run_check=False,
                                       shape=torch.Size(layout["shape"]), stride=tuple(layout["stride"]))
            values[key] = t
        state[index[name]] = values
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, info["param_groups"], strict=True):
        hyper = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items() if k != "params"}
        groups.append({**hyper, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a `save_checkpoint` directory into the (sharded) model and optimizer; returns its meta dict.

    The model and optimizer must be built as for the run that saved (same adapters, same sharding, same number
    of ranks): every rank reads only its own files, checked against its shards, and nothing is unpickled.
    """
    path = Path(path)
    error: BaseException | None = None
    try:
        meta = read_json(path / META_NAME)
        info, tensors = _read_rank(path, model, optimizer)
    except Exception as e:  # noqa: BLE001 (raised below, once the other ranks know)
        error = e
    _agree(error, f"reading the checkpoint {path}")
    try:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, t in tensors.items():
                if key.startswith("param."):
                    local(params[key[6:]]).copy_(t)
        if "optimizer_dir" in info:
            optimizer.load_checkpoint(path / OPTIM_DIR)  # verifies its checksums; may fail on one rank only
        else:
            optimizer.load_state_dict(_optimizer_state(info, tensors, model, optimizer))
    except Exception as e:  # noqa: BLE001 (raised below, once the other ranks know)
        error = e
    _agree(error, f"loading the checkpoint {path}")
    return meta


def gather_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable tensors on rank 0's CPU, e.g. to write the adapter; {} on other ranks.

    A collective: every rank must call it. The base weights are left out (they are the base model's).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
