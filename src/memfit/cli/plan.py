"""`memfit plan`: the memory a fine-tune, a generation or a server will take, component by component, before it
runs (`memfit.plan`).

It takes the flags of `memfit finetune` (the same generated options), so a plan is the run's command with
`finetune` replaced by `plan`; --data is optional (it sets the task and a classifier's labels).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memfit.cli.app import app
from memfit.cli.finetune import _common_params, _MethodFlags, method_config
from memfit.cli.options import build_command, field_params, flag_name, option_param
from memfit.errors import ConfigError
from memfit.serve.loading import ServeConfig
from memfit.tiers.budget import format_size
from memfit.train.config import TrainConfig

_FLAGS = _MethodFlags(from_scratch=False)  # the method options finetune takes
_KINDS = ["finetune", "generate", "serve"]
_SERVING = ["max_loras", "max_cpu_loras", "max_lora_rank", "max_seqs", "kv_budget"]  # ServeConfig's own flags
_GEN = "Generation and serving"
_KEPT = ("model", "task", "method", "targets", "modules_to_save", "sets", "device")


def _run(**values: Any) -> None:
    from memfit.plan import plan_finetune
    from memfit.train.data import label_names, load_rows

    serving = {k: values.pop(k) for k in _SERVING}
    generation = {k: values.pop(k) for k in ("prompt_tokens", "max_new_tokens", "prompts", "adapters")}
    train_names = [f.name for f in dataclasses.fields(TrainConfig)]
    train = TrainConfig(**{k: values.pop(k) for k in train_names})
    if values["for_"] not in _KINDS:
        raise ConfigError(f"--for {values['for_']!r}: choose one of {', '.join(_KINDS)}.")
    if values["for_"] != "finetune":
        plan, command = _plan_generation(values, serving, generation, train)
        _print(plan, values, f"{values['for_']} on {values['model']}", command)
        return
    adapter = method_config(values["method"], {k: values.pop(k) for k in _FLAGS.fields}, values["targets"],
                            values["modules_to_save"], values["sets"])
    task, labels = values["task"], None
    if values["data"] is not None:
        rows, task = load_rows(values["data"], task)
        labels = label_names(rows) if task == "classify" else None
    command = None
    if values["memory"] is not None:
        from memfit.plan.search import fit_memory

        fit = fit_memory(values["model"], adapter, train, values["memory"], task=task or "causal-lm",
                         labels=labels, device=values["device"])
        plan, command = fit.plan, _command(values, adapter, fit.train)
    else:
        plan = plan_finetune(values["model"], adapter, train, task=task or "causal-lm", labels=labels,
                             device=values["device"])
    _print(plan, values, f"{adapter.method} on {values['model']}", command)


def _plan_generation(values: dict[str, Any], serving: dict[str, Any], generation: dict[str, Any],
                     train: TrainConfig) -> tuple[Any, str | None]:
    """(plan, the command --memory chose or None) of a generation or a server."""
    from memfit.plan.generate import plan_generate, plan_serve
    from memfit.serve.loading import ServeConfig

    adapters = {f"adapter{i}": str(d) for i, d in enumerate(generation["adapters"])}
    config = ServeConfig(adapters=adapters or None, serve_adapters=bool(adapters) or values["for_"] == "serve",
                         quantize=train.quantize, weights_budget=train.weights_budget,
                         expert_budget=train.expert_budget, lean_allocator=train.lean_allocator,
                         device=values["device"], **serving)
    shape = None if values["for_"] == "serve" else (generation["prompt_tokens"], generation["max_new_tokens"],
                                                    generation["prompts"])
    if shape is not None and adapters:
        config = replace(config, max_loras=1)  # as memfit generate serves its one adapter
    if values["memory"] is not None:
        from memfit.plan.search import fit_serving

        fit = fit_serving(values["model"], config, values["memory"], shape)
        adapter_flags = [f"--adapter {shlex.quote(d)}" if shape else f"--adapter {n}={shlex.quote(d)}"
                         for n, d in adapters.items()]
        return fit.plan, " ".join(["memfit", values["for_"], "--model", shlex.quote(str(values["model"])),
                                   *adapter_flags, *fit.changes])
    if shape is None:
        return plan_serve(values["model"], config), None
    return plan_generate(values["model"], config, *shape), None


def _print(plan: Any, values: dict[str, Any], what: str, command: str | None = None) -> None:
    if values["json"]:
        typer.echo(json.dumps({**plan.to_dict(), **({"command": command} if command else {})}))
        return
    table = Table(title=f"memory plan: {what} ({plan.device})")
    for name, justify in (("component", "left"), ("size", "right"), ("note", "left")):
        table.add_column(name, justify=justify)
    for c in plan.components:
        table.add_row(c.name, format_size(c.bytes), c.note)
    table.add_row("peak", format_size(plan.peak_bytes), "the sum at the highest point", style="bold")
    console = Console()
    console.print(table)
    for note in plan.notes:
        console.print(note, highlight=False, soft_wrap=True)
    if command:
        console.print(f"fits in {values['memory']}:\n  {command}", highlight=False, soft_wrap=True)


def _command(values: dict[str, Any], adapter: Any, train: TrainConfig) -> str:
    """The `memfit finetune` command of these settings: every option that differs from its default, spelled out."""
    def quote(v: Any) -> str:
        text = json.dumps(v) if isinstance(v, list | dict) else str(v)
        return shlex.quote(text)

    parts = ["memfit", "finetune", "--model", quote(values["model"]),
             "--data", quote(values["data"]) if values["data"] is not None else "DATA", "--out", "OUT",
             "--method", adapter.method]
    if values["task"] is not None:
        parts += ["--task", values["task"]]
    if values["device"] is not None:
        parts += ["--device", values["device"]]
    default = type(adapter)()
    for f in dataclasses.fields(adapter):
        value = getattr(adapter, f.name)
        if value == getattr(default, f.name):
            continue
        if f.name == "target_modules":
            parts += ["--targets", quote(value if isinstance(value, str) else ",".join(value))]
        elif f.name == "modules_to_save":
            parts += ["--modules-to-save", quote(",".join(value))]
        else:
            parts += ["--set", quote(f"{f.name}={json.dumps(value) if isinstance(value, list) else value}")]
    plain = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(train, f.name)
        if value != getattr(plain, f.name):
            parts += [flag_name(f)] if value is True else [flag_name(f), quote(value)]
    return " ".join(parts)


def _register() -> None:
    common = [p for p in _common_params(False) if p.name in _KEPT]
    params = [*common,
              option_param("for_", str, "--for", default="finetune",
                           help="What to plan: a fine-tune (its flags below), `memfit generate` (--prompt-tokens, "
                           "--max-new-tokens, --prompts) or `memfit serve` (at its --kv-budget and --max-seqs)."),
              option_param("prompt_tokens", int, "--prompt-tokens", default=128, min=1, help="generate: tokens of "
                           "the longest prompt.", rich_help_panel=_GEN),
              option_param("max_new_tokens", int, "--max-new-tokens", default=64, min=1, help="generate: tokens "
                           "generated per prompt.", rich_help_panel=_GEN),
              option_param("prompts", int, "--prompts", default=1, min=1, help="generate: prompts in the batch.",
                           rich_help_panel=_GEN),
              option_param("adapters", list[Path], "--adapter", default=[], help="generate/serve: an adapter run "
                           "(repeatable for serve).", rich_help_panel=_GEN),
              *field_params(ServeConfig, names=_SERVING),
              option_param("data", Path | None, "--data", help="The run's JSONL data (optional): sets the task and a "
                           "classifier's labels."),
              option_param("memory", str | None, "--memory", help="Choose the settings that fit this much memory "
                           "(e.g. '2GB'): for a fine-tune the micro-batch, then AdamW8bit, then the frozen layers "
                           "streamed (--weights-budget), then an NF4 base; for generate/serve fewer rows at once or "
                           "a smaller --kv-budget, then an NF4 base, then the layers streamed; prints "
                           "their plan and the command to run."),
              option_param("json", bool, "--json", default=False, help="Print the plan as one JSON object (bytes "
                           "per component and peak_bytes), for scripts."),
              *_FLAGS.params(), *field_params(TrainConfig)]
    _run.__name__ = "plan"
    app.command("plan")(build_command(_run, params, """Predict the peak memory of a fine-tune, component by component.

    Builds the model from its config on fake tensors (no weight is read), injects the adapter, builds the optimizer
    and traces one whole update: weights, trainable weights, gradients, optimizer states and activations are the
    bytes memfit's own code would allocate for this batch and length. Takes `memfit finetune`'s flags. --for
    generate|serve runs the serving engine's own prefill and last decode step instead: weights, adapter slots, KV
    cache and activations.

    Example: memfit plan --model ./smollm2 --method lora --targets all-linear --batch-size 8 --max-length 256
    Example: memfit plan --for serve --model ./smollm2 --kv-budget 8192 --max-seqs 16
    """))


_register()
