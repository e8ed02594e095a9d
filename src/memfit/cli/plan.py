"""`memfit plan`: the memory a fine-tune will take, component by component, before it runs (`memfit.plan`).

It takes the flags of `memfit finetune` (the same generated options), so a plan is the run's command with
`finetune` replaced by `plan`; --data is optional (it sets the task and a classifier's labels).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memfit.cli.app import app
from memfit.cli.finetune import _common_params, _MethodFlags, method_config
from memfit.cli.options import build_command, field_params, option_param
from memfit.tiers.budget import format_size
from memfit.train.config import TrainConfig

_KEPT = ("model", "task", "method", "targets", "modules_to_save", "sets", "device")


def _run(**values: Any) -> None:
    from memfit.plan import plan_finetune
    from memfit.train.data import label_names, load_rows

    flags = _MethodFlags(from_scratch=False)
    train_names = [f.name for f in dataclasses.fields(TrainConfig)]
    train = TrainConfig(**{k: values.pop(k) for k in train_names})
    adapter = method_config(values["method"], {k: values.pop(k) for k in flags.fields}, values["targets"],
                            values["modules_to_save"], values["sets"])
    task, labels = values["task"], None
    if values["data"] is not None:
        rows, task = load_rows(values["data"], task)
        labels = label_names(rows) if task == "classify" else None
    plan = plan_finetune(values["model"], adapter, train, task=task or "causal-lm", labels=labels,
                         device=values["device"])
    if values["json"]:
        typer.echo(json.dumps(plan.to_dict()))
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


def _register() -> None:
    flags = _MethodFlags(from_scratch=False)
    common = [p for p in _common_params(False) if p.name in _KEPT]
    params = [*common,
              option_param("data", Path | None, "--data", help="The run's JSONL data (optional): sets the task and a "
                           "classifier's labels."),
              option_param("json", bool, "--json", default=False, help="Print the plan as one JSON object (bytes "
                           "per component and peak_bytes), for scripts."),
              *flags.params(), *field_params(TrainConfig)]
    _run.__name__ = "plan"
    app.command("plan")(build_command(_run, params, """Predict the peak memory of a fine-tune, component by component.

    Builds the model from its config on fake tensors (no weight is read), injects the adapter, builds the optimizer
    and traces one whole update: weights, trainable weights, gradients, optimizer states and activations are the
    bytes memfit's own code would allocate for this batch and length. Takes `memfit finetune`'s flags.

    Example: memfit plan --model ./smollm2 --method lora --targets all-linear --batch-size 8 --max-length 256
    """))


_register()
