"""`memfit plan`: the memory a fine-tune will take, component by component, before it runs (`memfit.plan`).

It takes the flags of `memfit finetune` (the same generated options), so a plan is the run's command with
`finetune` replaced by `plan`; --data is optional (it sets the task and a classifier's labels).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memfit.cli.app import app
from memfit.cli.finetune import _common_params, _MethodFlags, method_config
from memfit.cli.options import build_command, field_params, flag_name, option_param
from memfit.tiers.budget import format_size
from memfit.train.config import TrainConfig

_FLAGS = _MethodFlags(from_scratch=False)  # the method options finetune takes
_KEPT = ("model", "task", "method", "targets", "modules_to_save", "sets", "device")


def _run(**values: Any) -> None:
    from memfit.plan import plan_finetune
    from memfit.train.data import label_names, load_rows

    train_names = [f.name for f in dataclasses.fields(TrainConfig)]
    train = TrainConfig(**{k: values.pop(k) for k in train_names})
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
    if values["json"]:
        typer.echo(json.dumps({**plan.to_dict(), **({"command": command} if command else {})}))
        return
    table = Table(title=f"memory plan: {adapter.method} on {values['model']} ({plan.device})")
    for name, justify in (("component", "left"), ("size", "right"), ("note", "left")):
        table.add_column(name, justify=justify)
    for c in plan.components:
        table.add_row(c.name, format_size(c.bytes), c.note)
    table.add_row("peak", format_size(plan.peak_bytes), "the sum at the update's highest point", style="bold")
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
              option_param("data", Path | None, "--data", help="The run's JSONL data (optional): sets the task and a "
                           "classifier's labels."),
              option_param("memory", str | None, "--memory", help="Choose the settings that fit this much memory "
                           "(e.g. '2GB'): the micro-batch and the optimizer with the least slowdown; prints their "
                           "plan and the `memfit finetune` command to run."),
              option_param("json", bool, "--json", default=False, help="Print the plan as one JSON object (bytes "
                           "per component and peak_bytes), for scripts."),
              *_FLAGS.params(), *field_params(TrainConfig)]
    _run.__name__ = "plan"
    app.command("plan")(build_command(_run, params, """Predict the peak memory of a fine-tune, component by component.

    Builds the model from its config on fake tensors (no weight is read), injects the adapter, builds the optimizer
    and traces one whole update: weights, trainable weights, gradients, optimizer states and activations are the
    bytes memfit's own code would allocate for this batch and length. Takes `memfit finetune`'s flags.

    Example: memfit plan --model ./smollm2 --method lora --targets all-linear --batch-size 8 --max-length 256
    """))


_register()
