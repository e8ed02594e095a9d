"""The one training pipeline: from a local model directory and a JSONL file to a trained, saved run.

Its only branch is where the model comes from: a pretrained checkpoint (in memory, or built on the meta device
and streamed under a weights budget) that an adapter is injected into, or, for methods that compress a model
trained from the start (STABLE-RPS, `Method.from_scratch`), a freshly initialised model of the directory's
architecture. Everything else is shared, in its one correct order: ranks (torchrun or one process) -> output
directory -> data -> tokenizer -> model -> adapter (new, or the checkpoint's on resume) -> placement (FSDP2 or a
device) -> trainer (with the method's rank allocator if it has one) -> summary. `memfit finetune`, `memfit train`
and `memfit demo` are thin shells around `finetune()`; `load_finetuned()` loads what any run wrote.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from memfit import quant
from memfit.adapters import AdapterConfig, inject, load_adapter, save_adapter, trainable_parameters
from memfit.adapters.io import CONFIG_FILE, read_adapter_config
from memfit.adapters.registry import config_from_dict, get_method
from memfit.errors import CheckpointError, ConfigError
from memfit.local import from_pretrained, is_gguf, load_config, load_tokenizer
from memfit.local import model_dir as local_dir
from memfit.quant.checkpoint import empty_quantized, is_quantized_dir
from memfit.tiers.memory import lean_allocator, peak_bytes, release_checkpoint_map
from memfit.tiers.modules import KeysFor, checkpoint_key, empty_weights, move_model, suffix_keys
from memfit.tiers.st_reader import SafetensorsReader
from memfit.tiers.stream import stream_weights
from memfit.train.allocation import AllocatorCallback
from memfit.train.callbacks import Callback
from memfit.train.config import TrainConfig
from memfit.train.data import check_labels, label_names, load_rows
from memfit.train.memory import (
    measured_components,
    memory_rows,
    optimizer_state_bytes,
    plan_rows,
    print_memory_table,
)
from memfit.train.tasks import TASKS, Task
from memfit.train.trainer import CHECKPOINT, Ranks, Trainer, checkpoint_dir

RUN_FILES = ("metrics.jsonl", "loss.png", "ranks.png", "adapter.safetensors", CONFIG_FILE)


def make_ranks(config: TrainConfig, device: str | None = None) -> Ranks:
    if config.shard is not None:
        from memfit.train.distributed import init_distributed

        info = init_distributed()
        return Ranks(info.device, info.rank, info.world_size)
    return Ranks(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def auto_class(task: Task) -> Any:
    import transformers

    return getattr(transformers, task.auto_class)


def _new_modules(names: list[str]) -> list[str]:
    """Top-level owners of parameters the checkpoint lacks (a fresh classification head)."""
    owners = sorted({n.rpartition(".")[0] for n in names})
    return [o for o in owners if o and not any(o.startswith(p + ".") for p in owners if p != o)]


def load_base(directory: str | os.PathLike, task: Task, *, fresh: bool = False,
              weights_budget: int | str | None = None, device: torch.device | str = "cpu",
              quantize: str | None = None, expert_budget: int | str | None = None) -> tuple[nn.Module, Any, list[str]]:
    """(model, stream handle or None, modules the checkpoint lacks) for `task`, in fp32: where a run's model comes
    from, and the only place that differs between pretrained and from-scratch runs.

    fresh: a newly initialised model of the directory's architecture (its weights, if any, are not read).
    weights_budget: build on the meta device and stream the frozen layers from the checkpoint's safetensors;
        modules the checkpoint lacks are initialised as from_pretrained would.
    quantize: 'nf4' or 'int8': quantize the frozen Linear weights as they load (memfit.quant); a checkpoint written
        by `memfit quantize` comes back quantized without it.
    expert_budget: a Mixture-of-Experts causal LM with its experts offloaded behind a cache of this many bytes
        (`memfit.moe.load`); the other weights are read into memory.
    """
    cls = auto_class(task)
    if fresh:
        model = cls.from_config(load_config(directory, **task.model_kwargs()), dtype=torch.float32)
        model.config._name_or_path = str(Path(directory).resolve())  # where load_finetuned finds the architecture
        return model, None, []
    root = local_dir(directory)
    if expert_budget is not None:
        return _load_moe(root, task, expert_budget, device), None, []
    if weights_budget is None:
        # An absolute path in config._name_or_path lets `memfit export` find the base model again.
        model, info = from_pretrained(cls, root, dtype=torch.float32, output_loading_info=True,
                                      **task.model_kwargs())
        new = _new_modules(info["missing_keys"])
        if quantize is not None:
            quant.quantize(model, quant.QuantConfig(kind=quantize, skip=[*quant.HEADS, *new]))
        release_checkpoint_map(model)  # after quantizing, or experts fused as they loaded
        return model, None, new
    if quantize is not None:
        raise ConfigError(f"--quantize with --weights-budget would quantize every layer at every read; write the "
                          f"quantized checkpoint once (memfit quantize --model {root} --out DIR --kind {quantize}) "
                          "and stream DIR.")
    if is_gguf(root):
        raise ConfigError(f"{root} is a GGUF file, which cannot be streamed (its tensors are quantized by llama.cpp's "
                          f"layout); convert it once with `memfit convert --gguf {root} --out DIR` and stream DIR.")
    config = load_config(root, **task.model_kwargs())
    if is_quantized_dir(root):  # streams the quantized bytes: codes and scales are what is read per layer
        model = empty_quantized(cls, root, config)
    else:
        with empty_weights():
            model = cls.from_config(config, dtype=torch.float32)
    model.config._name_or_path = str(root.resolve())
    new = missing_modules(root, [n for n, p in model.named_parameters() if p.is_meta])
    for name in new:  # initialise the fresh head on the CPU, as from_pretrained does
        module = model.get_submodule(name)
        module.to_empty(device="cpu")
        model._init_weights(module) if hasattr(model, "_init_weights") else module.reset_parameters()
    return model, stream_weights(model, root, weights_budget, device=device, vocab=True), new


def missing_modules(root: Path, names: list[str], keys_for: KeysFor = suffix_keys) -> list[str]:
    """Top-level owners of the parameters `names` that the checkpoint in `root` lacks (a fresh classification
    head), from its safetensors headers alone; `keys_for` gives a name's candidate keys on disk."""
    with SafetensorsReader(root, drop_cache=False) as reader:
        return _new_modules([n for n in names if checkpoint_key([n], reader, keys_for) is None])


def _load_moe(root: Path, task: Task, expert_budget: int | str, device: torch.device | str) -> nn.Module:
    from memfit.moe import load as load_offloaded

    if task.auto_class != "AutoModelForCausalLM":
        raise ConfigError(f"--expert-budget fine-tunes causal language models; this run's task needs a "
                          f"{task.auto_class} (train a classifier with the experts in memory, without it).")
    if torch.device(device).type != "cpu":
        raise ConfigError(f"--expert-budget computes the offloaded experts on the CPU, from its cache in host RAM; "
                          f"run with --device cpu (got {device}).")
    model = load_offloaded(root, expert_budget=expert_budget)
    model.config._name_or_path = str(root.resolve())
    return model


def check_expert_targets(model: nn.Module, adapter: AdapterConfig) -> None:
    """Targets that name the offloaded experts' weights are an error: they stay frozen on disk (an adapter on them
    would have to live in every expert read). Shared experts are ordinary resident modules and can be targeted."""
    if getattr(model, "memfit_moe", None) is None:
        return
    targets = adapter.target_modules
    named = [t for t in ([targets] if isinstance(targets, str) else targets or [])
             if "gate_up_proj" in t or "expert" in t.replace("shared_expert", "")]
    if named:
        raise ConfigError(f"targets {named} name the routed experts' weights, which stay offloaded and frozen with "
                          "--expert-budget (LoRA on the experts themselves is not supported); target attention "
                          "(q_proj,k_proj,v_proj,o_proj), shared experts or dense MLPs, or 'all-linear' (which "
                          "covers every resident Linear).")


def _check_vocab(model: nn.Module, tokenizer: Any) -> None:
    size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {size}; raise "
                          "vocab_size in config.json (or use a smaller tokenizer).")


def _adapter_for_resume(model: nn.Module, checkpoint: Path, requested: AdapterConfig) -> None:
    saved = config_from_dict(read_adapter_config(checkpoint / "model")["config"])
    if not _same_request(saved, requested):
        raise CheckpointError(f"the checkpoint in {checkpoint} holds a {saved.method!r} adapter with config "
                              f"{saved.to_dict()}, not the requested {requested.to_dict()}; resume with the same "
                              "method and options.")
    load_adapter(model, checkpoint / "model")


def _same_request(saved: AdapterConfig, requested: AdapterConfig) -> bool:
    """Whether `requested` asks for the adapter `saved` holds: equal fields, where a field left unset (None) in
    the request matches whatever the method derived for it when the run started."""
    if saved.method != requested.method:
        return False
    mine, theirs = requested.to_dict(), saved.to_dict()
    return all(v is None or theirs.get(k) == v for k, v in mine.items())


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to overwrite a run silently: a finished one needs --overwrite, an interrupted one --resume."""
    if resume:
        return
    finished, interrupted = (out / CONFIG_FILE).is_file(), (out / CHECKPOINT).exists()
    if (finished or interrupted) and not overwrite:
        if finished:
            raise ConfigError(f"{out} holds a finished run ({CONFIG_FILE}); pass --overwrite to replace it, or "
                              "choose another --out.")
        raise ConfigError(f"{out} holds an interrupted run ({CHECKPOINT}/); continue it with --resume, or pass "
                          "--overwrite to start over.")


def _clear_out(out: Path, resume: bool, ranks: Ranks) -> None:
    """Remove the run --overwrite replaces: only once everything before training was checked, so a run that
    fails on bad input leaves the old one whole."""
    if not resume and ranks.main and ((out / CONFIG_FILE).is_file() or (out / CHECKPOINT).exists()):
        for name in (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.partial", "optimizer-swap"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    ranks.barrier()


def finetune(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             adapter: AdapterConfig, train: TrainConfig | None = None, eval_data: str | os.PathLike | None = None,
             task: str | None = None, resume: bool = False, overwrite: bool = False, device: str | None = None,
             callbacks: list[Callback] | None = None, quiet: bool = False,
             planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `adapter` (any registered method's config) on the model in `model_dir` with the rows of `data`;
    writes the run to `out`. For a method that compresses a model from scratch (STABLE-RPS), `model_dir` only
    gives the architecture and the tokenizer.

    resume: continue the interrupted run in `out` step for step; overwrite: replace a run `out` already holds.
    planned: `memfit.plan`'s prediction for this run (`Plan.to_dict()`): printed beside what was measured at the end,
        and both logged in metrics.jsonl's "end" event (memory_planned, memory_measured).
    Returns the summary: eval metrics, time, peak memory, parameter counts, and what the method reports.
    """
    train = train or TrainConfig()
    method = get_method(adapter.method)
    fresh = method.from_scratch
    if fresh and (train.shard is not None or train.weights_budget is not None or train.expert_budget is not None):
        raise ConfigError(f"{adapter.method} trains every weight of a model from scratch, in memory: it does not "
                          "shard or stream (drop --shard / --weights-budget / --expert-budget).")
    if train.optim == "mezo" and method.allocator is not None:
        raise ConfigError(f"{adapter.method} allocates rank from gradient-based importance, which --optim mezo never "
                          "computes (forward passes only); use lora, mos, difffit, compacter or full with mezo.")
    out = Path(out)
    local_dir(model_dir, weights=not fresh)  # a missing or incomplete directory fails before anything else
    # offloaded experts compute on the CPU: a GPU elsewhere in the machine is not this run's default
    ranks = make_ranks(train, device or ("cpu" if train.expert_budget is not None else None))
    _check_out(out, resume, overwrite)
    if train.lean_allocator and ranks.device.type == "cpu" and not lean_allocator():
        Console(stderr=True, quiet=quiet).print("--lean-allocator needs glibc (Linux): ignored here.", highlight=False)
    torch.manual_seed(train.seed)  # initialisation and dropout: a run is a function of its seed
    console = Console(quiet=quiet or not ranks.main)
    rows, task = load_rows(data, task)
    eval_rows = load_rows(eval_data, task)[0] if eval_data is not None else []
    labels = label_names(rows) if task == "classify" else None
    if labels is not None and eval_rows:
        check_labels(eval_rows, labels, eval_data)
    task_obj = TASKS[task](labels)
    tokenizer = load_tokenizer(model_dir)
    model, stream, new_modules = load_base(model_dir, task_obj, fresh=fresh, weights_budget=train.weights_budget,
                                           device=ranks.device, quantize=train.quantize,
                                           expert_budget=train.expert_budget)
    check_expert_targets(model, adapter)
    if quant.quantized_modules(model) and (fresh or adapter.method == "full"):
        raise ConfigError(f"--method {adapter.method} trains the base weights, which are quantized (frozen) here; "
                          "train an adapter on a quantized base (--method lora, ...), or use the fp32 model.")
    if fresh:
        _check_vocab(model, tokenizer)
    if labels is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence heads find the last real token by it
    if new_modules and not adapter.modules_to_save:
        adapter = replace(adapter, modules_to_save=new_modules)  # a fresh head must train, or it stays random
    if resume and ranks.world_size == 1:
        _adapter_for_resume(model, checkpoint_dir(out), adapter)
    else:
        inject(model, adapter)
    if train.shard is not None:
        from memfit.train.distributed import shard_model

        shard_model(model, train.shard, train.cpu_offload)
    else:
        move_model(model, ranks.device)  # streamed layers are installed on the device as they run

    extra = {"task": task, "labels": labels, "from_scratch": fresh, "pad_token_id": tokenizer.pad_token_id,
             "quantize": train.quantize, "expert_budget": train.expert_budget}

    def save(model: nn.Module, directory: Path) -> None:
        if ranks.world_size > 1:
            from memfit.train.distributed import gather_trainable_state

            state = gather_trainable_state(model)  # a collective: every rank takes part
            if ranks.main:
                save_adapter(model, directory, extra=extra, state=state)
        else:
            save_adapter(model, directory, extra=extra)

    for note in model.memfit_notes:
        console.print(note, highlight=False, soft_wrap=True)
    encode = lambda rs: [task_obj.encode(r, tokenizer, train.max_length) for r in rs]  # noqa: E731
    allocator = [AllocatorCallback()] if method.allocator is not None else []
    _clear_out(out, resume, ranks)
    plan_check = [_PlanCheck(planned)] if planned is not None else []
    trainer = Trainer(model, task_obj, encode(rows), encode(eval_rows), train, out, tokenizer.pad_token_id, save,
                      callbacks=[*allocator, *plan_check, *(callbacks or [])], ranks=ranks, quiet=quiet)
    print_memory_table("memory plan", memory_rows(model, trainer.optimizer, train.optim, stream), console)
    summary = trainer.fit(resume=resume)
    measured = {**trainer.memory, "peak": summary["peak_mem_bytes"]}
    print_memory_table("memory used", memory_rows(model, trainer.optimizer, train.optim, stream, measured), console)
    if planned is not None:
        print_memory_table("memory: planned and measured", plan_rows(planned, summary["memory_measured"]), console,
                           columns=("component", "planned", "measured", "measured ÷ planned"))
    trainable, total = trainable_parameters(model)
    experts = getattr(model, "memfit_moe", None)
    if experts is not None:  # offloaded experts are no module's parameters, but they are the model's
        total += experts.store.num_parameters
    summary.update(trainable_params=trainable, total_params=total, task=task, method=adapter.method, memory=measured,
                   optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer)[0],
                   notes=list(model.memfit_notes), **(method.report(model) if method.report else {}))
    if experts is not None:
        summary["experts"] = {**experts.memory(), **experts.phase_summary(), "bytes_read": experts.stats.bytes_read}
    if stream is not None:
        summary["stream"] = {**stream.memory(), "bytes_read": stream.stats.bytes_read,
                             "layer_reads": stream.stats.layer_reads}
    if train.shard is not None:
        from memfit.train.distributed import teardown_distributed

        teardown_distributed()
    return summary


class _PlanCheck(Callback):
    """Puts the plan and the measured components in the run's "end" event (metrics.jsonl), as
    memory_planned / memory_measured."""

    def __init__(self, planned: dict[str, Any]) -> None:
        self.planned = planned

    def on_train_end(self, trainer: Trainer) -> dict[str, Any]:
        measured = {**trainer.memory, "peak": peak_bytes(trainer.ranks.device)}
        return {"memory_planned": {**self.planned["components"], "peak": self.planned["peak_bytes"]},
                "memory_measured": measured_components(trainer.model, trainer.optimizer, measured,
                                                       trainer.ranks.device)}


def load_finetuned(run_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                   device: str = "cpu", offload_experts: bool = True) -> nn.Module:
    """The model a run wrote to `run_dir`, ready for inference, merge or export: the base model with the adapter
    loaded, or the compressed model of a from-scratch run.

    model_dir: the base model (or the architecture, for from-scratch runs); defaults to the one recorded in the run.
    offload_experts: a run trained with --expert-budget loads with its experts offloaded again (False: every
        weight in memory, as a merge needs).
    """
    meta = read_adapter_config(run_dir)
    model_dir = model_dir or meta.get("base_model")
    if not model_dir:
        raise CheckpointError(f"{run_dir} records no base model; pass it with --model (model_dir).")
    task = TASKS[meta.get("task") or "causal-lm"](meta.get("labels"))
    model = load_base(model_dir, task, fresh=bool(meta.get("from_scratch")), quantize=meta.get("quantize"),
                      expert_budget=meta.get("expert_budget") if offload_experts else None, device=device)[0]
    if meta.get("labels") is not None:
        model.config.pad_token_id = meta.get("pad_token_id")  # sequence heads find the last real token by it
    return load_adapter(model, run_dir).to(device).eval()
