"""`memfit finetune` and `memfit train`: one pipeline (`memfit.train.finetune`), two faces.

`finetune` adapts a pretrained model with any adapter method; `train` trains a model compressed from scratch
(methods with `from_scratch`). Both take the same options, generated from `TrainConfig` and from the method
configs' flagged fields (`memfit.cli.options`); any method option is reachable with `--set KEY=VALUE`.
`memfit methods` lists every method and its options.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memfit.adapters import AdapterConfig, get_method, methods
from memfit.cli.app import app
from memfit.cli.options import build_command, field_params, flag_name, option_param, parse_sets, parse_targets
from memfit.errors import ConfigError, MemfitError
from memfit.fields import field_types
from memfit.tiers.budget import format_size
from memfit.train.allocation import rank_grid
from memfit.train.config import TrainConfig
from memfit.train.finetune import finetune as run_pipeline

METHOD_PANEL = "Method"
# A model trained from scratch is held whole.
_SCRATCH_ONLY = ("weights_budget", "expert_budget", "shard", "cpu_offload")


class _MethodFlags:
    """The flagged fields of a group of method configs, merged: one flag per field name, shared by the methods
    that have it (their types must agree)."""

    def __init__(self, from_scratch: bool) -> None:
        self.methods = {n: m for n, m in methods().items() if m.from_scratch == from_scratch}
        self.owners: dict[str, list[str]] = {}
        self.fields: dict[str, tuple[type, dataclasses.Field]] = {}
        for name, method in self.methods.items():
            hints = field_types(method.config_cls)
            for f in dataclasses.fields(method.config_cls):
                if not f.metadata.get("flag"):
                    continue
                seen = self.fields.get(f.name)
                if seen is not None and not _compatible(field_types(seen[0])[f.name], hints[f.name]):
                    raise TypeError(f"{f.name} has different types in {self.owners[f.name]} and {name}")
                self.fields.setdefault(f.name, (method.config_cls, f))
                self.owners.setdefault(f.name, []).append(name)

    def params(self) -> list:
        out = []
        for name, (cls, _) in self.fields.items():
            out += field_params(cls, names=[name], unset=True, panel=METHOD_PANEL,
                                help_suffix=lambda f, n=name: f" ({self._defaults(n)})")
        return out

    def _defaults(self, name: str) -> str:
        parts = []
        for method in self.owners[name]:
            f = next(f for f in dataclasses.fields(self.methods[method].config_cls) if f.name == name)
            parts.append(f"{method} {'derived' if f.default is None else f.default}")
        return "default: " + ", ".join(parts)


def _compatible(a: Any, b: Any) -> bool:
    """int and int | None share one flag (None there means the method derives it)."""
    strip = lambda t: {x for x in getattr(t, "__args__", (t,)) if x is not type(None)}  # noqa: E731
    return strip(a) == strip(b)


def method_config(method: str, flags: dict[str, Any], targets: str | None, modules_to_save: str | None,
                  sets: list[str]) -> AdapterConfig:
    """The method's config from its flags, --targets, --modules-to-save and --set; unset ones keep the method's
    defaults. A flag the method does not have is an error naming the method's options."""
    cls = get_method(method).config_cls
    names = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in flags.items() if v is not None}
    for key in given:
        if key not in names:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to method {method!r}; its options are "
                              f"{sorted(names)} (set them with --set KEY=VALUE).")
    if targets is not None:
        given["target_modules"] = parse_targets(targets)
    if modules_to_save is not None:
        given["modules_to_save"] = [m.strip() for m in modules_to_save.split(",") if m.strip()]
    extra = parse_sets(sets, cls)
    both = sorted(set(given) & set(extra))
    if both:
        raise ConfigError(f"{both} given both as flags ({', '.join(flag_name(names[b]) for b in both)}) and with "
                          "--set; give each once.")
    return cls(**given, **extra)


def _common_params(scratch: bool) -> list:
    opt = option_param
    model_help = ("Directory with the architecture (config.json) and a tokenizer; weights, if present, are not "
                  "read." if scratch else "Local HF model directory (config.json, safetensors, tokenizer).")
    names = [n for n, m in methods().items() if m.from_scratch == scratch]  # registry order: lora first
    return [
        opt("model", Path, "--model", default=..., help=model_help),
        opt("data", Path, "--data", default=..., help='JSONL rows: {"text"}, {"prompt","completion"} or '
            '{"text","label"}. Any readable file (a pipe too).'),
        opt("out", Path, "--out", default=..., help="Output directory: the adapter (or compressed model), "
            "metrics.jsonl, loss.png, checkpoint/."),
        opt("eval_data", Path | None, "--eval-data", help="JSONL file to evaluate on (same format)."),
        opt("task", str | None, "--task", help="causal-lm or classify (default: from the data's fields)."),
        opt("method", str, "--method", default=names[0], help=f"Method: {', '.join(names)} (`memfit methods` "
            "describes each and its options).", rich_help_panel=METHOD_PANEL),
        opt("targets", str | None, "--targets", help="Modules to adapt: 'q_proj,v_proj', 'all-linear' or a regex "
            "(default: " + ("every Linear and Embedding)" if scratch else "the model's attention query and value "
            "projections)"), rich_help_panel=METHOD_PANEL),
        opt("modules_to_save", str | None, "--modules-to-save", help="Modules " + (
            "left dense" if scratch else "trained fully") + ", comma-separated (default: a new classification "
            "head)", rich_help_panel=METHOD_PANEL),
        opt("sets", list[str], "--set", default=[], help="Any method option as KEY=VALUE (repeatable), e.g. "
            "--set r_eq=2 --set dissociation=false; values are parsed by the option's type.",
            rich_help_panel=METHOD_PANEL),
        opt("resume", bool, "--resume", default=False, help="Continue the interrupted run in --out from its "
            "checkpoint, step for step."),
        opt("overwrite", bool, "--overwrite", default=False, help="Replace the run --out already holds."),
        opt("device", str | None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        opt("quiet", bool, "--quiet", "-q", default=False, help="No progress bar or tables; only where the "
            "outputs went."),
    ]


def _register(name: str, scratch: bool, doc: str) -> None:
    flags = _MethodFlags(scratch)
    train_names = [f.name for f in dataclasses.fields(TrainConfig) if not (scratch and f.name in _SCRATCH_ONLY)]
    memory = [] if scratch else [option_param(
        "memory", str | None, "--memory", help="Fit the run in this much memory, e.g. '2GB': `memfit plan` chooses "
        "the micro-batch (same examples per update, in --grad-accum steps), then AdamW8bit, then the frozen "
        "layers streamed from disk (--weights-budget), then an NF4 base, "
        "with the least slowdown, and on the CPU turns --lean-allocator on; the run prints planned against "
        "measured.",
        rich_help_panel="Memory"), option_param(
        "plan", bool, "--plan/--no-plan", default=True, help="Plan the run's memory first (`memfit plan` in a fresh "
        "process, a few seconds) and log planned against measured; --no-plan starts at once.",
        rich_help_panel="Memory")]
    params = [*_common_params(scratch), *memory, *flags.params(), *field_params(TrainConfig, names=train_names)]

    def run(**values: Any) -> None:
        train = TrainConfig(**{k: values.pop(k) for k in train_names})
        method_flags = {k: values.pop(k) for k in flags.fields}
        if values["method"] in methods() and values["method"] not in flags.methods:
            other = "finetune" if scratch else "train"
            raise ConfigError(f"method {values['method']!r} is not for `memfit {name}`: use `memfit {other} --method "
                              f"{values['method']}` (`memfit {name}` takes {', '.join(flags.methods)}).")
        config = method_config(values.pop("method"), method_flags, values.pop("targets"),
                               values.pop("modules_to_save"), values.pop("sets"))
        quiet, out = values["quiet"], values["out"]
        memory, plan = values.pop("memory", None), values.pop("plan", False)
        if memory is not None and not plan:
            raise ConfigError("--memory plans the run, which --no-plan forbids: drop one of them.")
        if memory is not None:
            train, planned = _fit(values, config, train, memory, Console(quiet=quiet))
        else:
            planned = _plan(values, config, train, Console(quiet=quiet)) if plan else None
        summary = run_pipeline(values.pop("model"), values.pop("data"), values.pop("out"), config, train, **values,
                               planned=planned)
        print_summary(summary, out, Console(quiet=quiet))
        if quiet:
            typer.echo(f"wrote the run to {out}")

    run.__name__ = name
    app.command(name)(build_command(run, params, doc))


def _task_labels(data: Path, task: str | None) -> tuple[str, list[str] | None]:
    from memfit.train.data import label_names, load_rows

    rows, task = load_rows(data, task)
    return task, (label_names(rows) if task == "classify" else None)


def _fit(values: dict[str, Any], adapter: AdapterConfig, train: TrainConfig, memory: str,
         console: Console) -> tuple[TrainConfig, dict]:
    """--memory: the settings `memfit.plan.fit_memory` chooses, announced; their plan is the run's."""
    from memfit.plan.isolated import plan_isolated

    if not Path(values["data"]).is_file():
        raise ConfigError("--memory plans from the data file, which must be a regular file (not a pipe).")
    task, labels = _task_labels(Path(values["data"]), values["task"])
    try:
        fit = plan_isolated(values["model"], adapter, train, task, labels, values["device"], memory=memory)
    except RuntimeError as e:
        raise ConfigError(f"--memory could not plan this run ({e}); run it without --memory.") from e
    chosen = " ".join(fit["changes"]) or "the settings as given"
    console.print(f"--memory {memory}: {chosen} (planned peak {format_size(fit['plan']['peak_bytes'])})",
                  highlight=False)
    return TrainConfig.from_dict(fit["train"]), fit["plan"]


def _plan(values: dict[str, Any], adapter: AdapterConfig, train: TrainConfig, console: Console) -> dict | None:
    """`memfit plan`'s prediction for this run, from a fresh process (tracing here would leave its garbage in the
    run's memory); None where the planner does not cover the run (its flags, or data from a pipe that cannot be
    read twice). A plan is advice: a failure to plan is one line, never a stopped run."""
    from memfit.plan.isolated import plan_isolated
    from memfit.plan.predict import UNCOVERED

    data = Path(values["data"])
    if not data.is_file() or any(getattr(train, k) not in (None, False) for k in UNCOVERED):
        return None
    try:
        task, labels = _task_labels(data, values["task"])
        return plan_isolated(values["model"], adapter, train, task, labels, values["device"])["plan"]
    except MemfitError:
        return None  # the run itself reports bad input, in its own words
    except Exception as e:  # noqa: BLE001  (an architecture the fake-tensor trace cannot run)
        console.print(f"no memory plan for this run: {type(e).__name__}: {e}"[:300], highlight=False)
        return None


def print_summary(summary: dict[str, Any], out: Path, console: Console) -> None:
    """The one summary every training run prints: metrics, parameters, method facts, time, peak, outputs."""
    footprint = summary.get("footprint")
    title = f"{summary['method']} on {summary['task']}"
    if footprint:
        title = f"{summary['method']} ({1 / footprint['compression']:.1f}× compressed) on {summary['task']}"
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if key.startswith("eval_"):
            table.add_row(key.removeprefix("eval_"), f"{value:.4f}")
    table.add_row("trainable parameters", f"{summary['trainable_params']:,} of {summary['total_params']:,}")
    if footprint:
        table.add_row("shared memory z", f"{footprint['z_params']:,} parameters, {format_size(footprint['z_bytes'])} "
                      f"(dense weights: {format_size(footprint['dense_bytes'])})")
    experts = summary.get("experts")
    if experts:
        table.add_row("offloaded experts", f"{format_size(experts['bytes_read'])} read; hit ratio forward "
                      f"{experts['forward']['hit_ratio']:.2f}, backward {experts['backward']['hit_ratio']:.2f}")
    table.add_row("train time", f"{summary['train_time_s']:.1f} s")
    table.add_row("peak memory", f"{format_size(summary['peak_mem_bytes'])} (since training started)")
    console.print(table)
    for note in summary.get("notes", []):
        console.print(note, highlight=False, soft_wrap=True)
    if "ranks" in summary:
        console.print(rank_table(summary["ranks"]))
        console.print(f"total rank {summary['total_rank']} of a budget of {summary['target_total_rank']}")
    files = "metrics.jsonl, loss.png and ranks.png" if "ranks" in summary else "metrics.jsonl and loss.png"
    what = "compressed model" if footprint else "adapter"
    console.print(f"{what}, {files} written to {out}", highlight=False)


def rank_table(ranks: dict[str, int]) -> Table:
    """The rank each module ended with: layers down, module kinds across."""
    layers, kinds, grid = rank_grid(ranks)
    table = Table(title="rank per module")
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for layer, row in zip(layers, grid, strict=True):
        table.add_row(str(layer), *("" if v is None else str(v) for v in row))
    return table


_register("finetune", scratch=False, doc="""Fine-tune an adapter (LoRA, MoS, ...) on a local Hugging Face model.

    Causal-LM rows are {"text": ...} or {"prompt": ..., "completion": ...} (loss on the completion only);
    classification rows are {"text": ..., "label": ...} and train a new head beside the adapter.

    Adaptive ranks: --method increlora grows ranks where importance is high, --method adalora prunes from a larger
    start; both print the rank each module ended with, log it to metrics.jsonl and draw ranks.png. On runs of a few
    hundred updates add --init lora: their factors then start as LoRA's do and learn at LoRA's rates.

    Example: memfit finetune --model ./tiny-llama --data train.jsonl --eval-data val.jsonl --method mos --out runs/a
    """)
_register("train", scratch=True, doc="""Train a model from scratch with its weights compressed (STABLE-RPS).

    Every Linear and Embedding weight is read from one shared memory z, --compression times their size
    (RandomFold hashing, per-slot gradient scaling); z and the small dense rest (norms, biases) train from the
    start. It saves memory, not compute. The summary shows the memory of z beside the dense weights it stands for.

    Example: memfit train --model ./tiny-llama --data text.jsonl --compression 0.1 --lr 3e-3 --out runs/rps
    """)


@app.command("methods")
def list_methods(name: str | None = typer.Argument(None, help="A method to describe (default: all).")) -> None:
    """List the adapter and compression methods with every option, its type, default and meaning."""
    chosen = {name: get_method(name)} if name else methods()
    console = Console()
    for method_name, method in chosen.items():
        hints = field_types(method.config_cls)
        what = "trains a model from scratch (memfit train)" if method.from_scratch else "adapts (memfit finetune)"
        table = Table(title=f"{method_name}: {what}", title_justify="left")
        for col in ("option", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for f in dataclasses.fields(method.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f" ({flag_name(f)})" if f.metadata.get("flag") else ""
            table.add_row(f.name + flag, str(hints[f.name]).replace("typing.", ""), repr(default),
                          f.metadata.get("help", ""))
        console.print(table)
