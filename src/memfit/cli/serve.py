"""`memfit generate`, `memfit serve`, `memfit merge`, `memfit convert`: run what was fine-tuned.

generate and serve share one engine (`memfit.serve`), so a prompt gives the same text from either; their memory
and adapter flags are generated from `ServeConfig`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memfit.cli.app import app
from memfit.cli.options import build_command, field_params
from memfit.cli.options import option_param as _opt
from memfit.errors import ConfigError, MemfitError
from memfit.local import load_tokenizer, model_dir
from memfit.plan.isolated import plan_generate_isolated, plan_serve_isolated
from memfit.serve.engine import Request, SamplingParams
from memfit.serve.loading import ServeConfig, build_engine, engine_memory
from memfit.serve.text import Decoder, chat_ids
from memfit.tiers.budget import format_size
from memfit.tiers.files import atomic_write
from memfit.tiers.memory import peak_bytes, reset_peak
from memfit.train.data import read_jsonl
from memfit.train.memory import plan_rows, print_memory_table
from memfit.train.metrics import MetricsLog

_MEMORY = ["weights_budget", "quantize", "expert_budget", "lean_allocator", "device"]
_SERVING = ["adapter_dir", "max_loras", "max_cpu_loras", "max_lora_rank", "max_seqs", "kv_budget"]


def _prompts(prompt: str | None, prompts: Path | None) -> list[str]:
    if (prompt is None) == (prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl.")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("--prompt is empty; pass some text, e.g. --prompt 'The capital of France is'.")
        return [prompt]
    texts = []
    for row in read_jsonl(prompts):
        text = row.data.get("prompt", row.data.get("text"))
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{prompts}:{row.line}: each line needs a non-empty "prompt" (or "text") string.')
        texts.append(text)
    return texts


def generate(**values: Any) -> None:
    texts = _prompts(values.pop("prompt"), values.pop("prompts"))
    out, chat, quiet = values.pop("out"), values.pop("chat"), values.pop("quiet")
    params = SamplingParams(max_new_tokens=values.pop("max_new_tokens"), temperature=values.pop("temperature"),
                            top_p=values.pop("top_p"), seed=values.pop("seed"))
    adapter, plan, memory = values.pop("adapter"), values.pop("plan"), values.pop("memory")
    model, metrics = values.pop("model"), _metrics_log(values.pop("metrics"))
    config = ServeConfig(adapters={"adapter": str(adapter)} if adapter else None, serve_adapters=adapter is not None,
                         max_loras=1, **values)
    tokenizer = load_tokenizer(model_dir(model))  # the prompts' lengths size a --memory fit, before the model
    encode = (lambda t: chat_ids(tokenizer, [{"role": "user", "content": t}])) if chat else (  # noqa: E731
        lambda t: list(tokenizer(t)["input_ids"]))
    console = Console(stderr=True, quiet=quiet)
    encoded = [encode(t) for t in texts]
    shape = (max(len(p) for p in encoded), params.max_new_tokens, len(encoded))
    if memory is not None:  # the chosen settings' plan is the run's
        config, planned = _fit(config, memory, console, lambda: plan_generate_isolated(str(model), config, *shape,
                                                                                     memory))
    else:
        planned = _plan(config, console, lambda: plan_generate_isolated(str(model), config, *shape)) if plan else None
    engine, _, _ = build_engine(model, config, tokenizer=tokenizer)
    decoders = [Decoder(tokenizer) for _ in texts]
    kv = [0]  # the largest KV cache seen
    stream = len(texts) == 1 and out is None
    requests = []
    for ids, decoder in zip(encoded, decoders, strict=True):
        def on_token(token: int, decoder: Decoder = decoder) -> None:
            kv[0] = max(kv[0], engine.kv_bytes())  # the batch's cache as this token leaves the step
            delta = decoder.push(token)
            if stream and delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
        requests.append(engine.submit(Request(ids, params, "adapter" if adapter else None, on_token)))
    reset_peak(engine.device)
    t0 = time.perf_counter()
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=stream or quiet, transient=True) as bar:
        task = bar.add_task("generating", total=len(requests))
        while engine.waiting or engine.running:
            engine.step()
            bar.update(task, completed=sum(r.finish_reason is not None for r in requests))
    seconds = time.perf_counter() - t0
    for r in requests:
        if r.finish_reason.startswith("error"):
            raise ConfigError(r.finish_reason.removeprefix("error: "))
    if stream:
        sys.stdout.write("\n")
        sys.stdout.flush()  # before the summary on stderr
    else:
        lines = [json.dumps({"prompt": t, "completion": d.text}) for t, d in zip(texts, decoders, strict=True)]
        body = "\n".join(lines) + "\n"
        if out is None:
            sys.stdout.write(body)
        else:
            atomic_write(out, lambda f: f.write(body), mode="w")
    tokens = sum(len(r.generated) for r in requests)
    first = min(r.first_token_s for r in requests) - t0
    console.print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s (first token after "
                  f"{first:.2f} s)" + (f"; wrote {out}" if out else ""), highlight=False)
    measured = {**engine_memory(engine), "KV cache": kv[0], "peak": peak_bytes(engine.device)}
    if planned is not None:
        print_memory_table("memory: planned and measured", plan_rows(planned, measured), console,
                           columns=("component", "planned", "measured", "measured ÷ planned"))
    if metrics is not None:
        metrics.log(_end_event("generate", planned, measured, tokens=tokens, seconds=seconds))


def _metrics_log(path: Path | None) -> MetricsLog | None:
    """--metrics PATH, created before the model loads, so that a path it cannot write is a one-line error now and
    not a traceback once the run is done: the file the run's end event is appended to."""
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(f"--metrics {path} is a directory; give a file, e.g. --metrics {path / 'metrics.jsonl'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        raise ConfigError(f"--metrics {path} cannot be written ({e.strerror or e}); give a file in a writable "
                          "folder.") from e
    return MetricsLog(path)


def _end_event(command: str, planned: dict | None, measured: dict[str, int], **extra: Any) -> dict[str, Any]:
    """The run's "end" event, as memfit finetune's metrics.jsonl has it: the peak, and the plan beside what was
    measured (memory_planned, memory_measured; no plan: measured only)."""
    event = {"event": "end", "command": command, **extra, "peak_mem_bytes": measured["peak"],
             "memory_measured": measured}
    if planned is not None:
        event["memory_planned"] = {**planned["components"], "peak": planned["peak_bytes"]}
    return event


def _fit(config: ServeConfig, memory: str, console: Console, fit: Callable[[], dict]) -> tuple[ServeConfig, dict]:
    """--memory: (the settings `memfit.plan.search.fit_serving` chose, their plan), from `fit()` in a fresh
    process, announced."""
    try:
        out = fit()
    except RuntimeError as e:
        raise ConfigError(f"--memory could not plan this run ({e}); run it without --memory.") from e
    chosen = ServeConfig(**out["serve"])
    console.print(f"--memory {memory}: {' '.join(out['changes']) or 'the settings as given'} (planned peak "
                  f"{format_size(out['plan']['peak_bytes'])})", highlight=False)
    return chosen, out["plan"]


def _plan(config: ServeConfig, console: Console, plan: Callable[[], dict]) -> dict | None:
    """The planner's prediction for this run (`plan()`: planned in a fresh process); None where it does not cover
    the run. A plan is advice: a failure to plan is one line, never a stopped run."""
    try:
        return plan()["plan"]
    except MemfitError:
        return None  # the run itself reports bad input, in its own words
    except RuntimeError as e:  # the planning process failed: an architecture the fake-tensor trace cannot run
        console.print(f"no memory plan for this run: {e}"[:300], highlight=False)
        return None


_GENERATE = [
    _opt("model", Path, "--model", default=..., help="Base model: an HF directory or a .gguf file (SmolLM2, ...)."),
    _opt("adapter", Path | None, "--adapter", help="A run of memfit finetune (LoRA, MoS, AdaLoRA, IncreLoRA) or a "
         "PEFT LoRA folder; other methods: `memfit merge` first."),
    _opt("prompt", str | None, "--prompt", "-p", help="Text to continue (tokens stream to the terminal)."),
    _opt("prompts", Path | None, "--prompts", help='JSONL of {"prompt": ...} (or "text"), generated as one '
         "continuous batch."),
    _opt("chat", bool, "--chat", default=False, help="Send each prompt as a user message through the chat template."),
    _opt("max_new_tokens", int, "--max-new-tokens", "-n", default=64, min=1, help="Tokens to generate per prompt."),
    _opt("temperature", float, "--temperature", default=0.0, min=0.0, help="0: greedy (the default); above 0: sample."),
    _opt("top_p", float, "--top-p", default=1.0, min=0.0, max=1.0, help="Nucleus sampling: the smallest set of "
         "tokens whose probability reaches top_p."),
    _opt("seed", int | None, "--seed", help="Seed of sampling (a run is a function of it)."),
    _opt("out", Path | None, "--out", help="Write one JSON line per prompt ({\"prompt\", \"completion\"}), in "
         "input order."),
    _opt("quiet", bool, "--quiet", "-q", default=False, help="Only the completions."),
    _opt("plan", bool, "--plan/--no-plan", default=True, help="Plan the memory first (memfit plan, a few seconds) "
         "and print planned against measured at the end."),
    _opt("metrics", Path | None, "--metrics", help="Append the run's end event to this JSONL file (created if "
         "absent): the peak and each memory component, planned and measured (memory_planned, memory_measured), as "
         "memfit finetune logs them in its metrics.jsonl.", rich_help_panel="Memory"),
    _opt("memory", str | None, "--memory", help="Fit in this much memory, e.g. '1GB': fewer rows at once "
         "(--max-seqs), then an NF4 base, then the layers streamed from disk (--weights-budget), as `memfit plan "
         "--for generate --memory` chooses.", rich_help_panel="Memory"),
    *field_params(ServeConfig, names=_MEMORY + ["max_seqs", "kv_budget"]),
]
app.command("generate")(build_command(generate, _GENERATE, """Generate text with a base model and an adapter.

    Greedy by default (--temperature 0); --chat applies the model's chat template. Dense models can stream their
    layers under --weights-budget; MoE models run with experts offloaded under --expert-budget.

    Example: memfit generate --model runs/smollm2 --adapter runs/lora --chat --prompt "Which section is vim in?"
    """))


def _adapter_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: write NAME=DIRECTORY, e.g. --adapter sections=runs/lora.")
        if name in pairs:
            raise ConfigError(f"--adapter {name} is given twice; each adapter needs its own name.")
        pairs[name] = path
    return pairs


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a captured SIGTERM once its graceful shutdown is done, which ends the process with
            # status 143; memfit finishes the requests in flight, stops its engine and exits normally.
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def serve(**values: Any) -> None:
    import uvicorn

    _Server = _server_class()

    from memfit.serve.app import ServerState, build_app

    host, port, allow = values.pop("host"), values.pop("port"), values.pop("allow_runtime_adapters")
    plan, memory = values.pop("plan"), values.pop("memory")
    model, metrics = values.pop("model"), _metrics_log(values.pop("metrics"))
    config = ServeConfig(adapters=_adapter_pairs(values.pop("adapters")), any_module=allow, **values)
    if config.adapter_dir is not None and not Path(config.adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {config.adapter_dir} is not a directory.")
    console = Console(stderr=True)
    if memory is not None:
        config, planned = _fit(config, memory, console, lambda: plan_serve_isolated(str(model), config, memory))
    else:
        planned = _plan(config, console, lambda: plan_serve_isolated(str(model), config)) if plan else None
    engine, tokenizer, name = build_engine(model, config)
    state = ServerState(engine.start(), tokenizer, name, Path(config.adapter_dir) if config.adapter_dir else None,
                        allow)
    if planned is not None:
        console.print(f"memory plan at --kv-budget {config.kv_budget}: peak {format_size(planned['peak_bytes'])}",
                      highlight=False)
    console.print(f"serving {name} with {len(config.adapters)} adapter(s) on http://{host}:{port}/v1",
                  highlight=False)
    reset_peak(engine.device)
    server = _Server(uvicorn.Config(build_app(state), host=host, port=port, log_level="warning",
                                    timeout_graceful_shutdown=None))
    try:  # SIGTERM: stop accepting, let the requests in flight finish, then return
        server.run()
    finally:
        engine.stop()
        measured = {**engine_memory(engine), "peak": peak_bytes(engine.device)}
        if planned is not None:
            print_memory_table("memory: planned (at the limits) and measured (since serving began)",
                               plan_rows(planned, measured), console,
                               columns=("component", "planned", "measured", "measured ÷ planned"))
        if metrics is not None:
            metrics.log(_end_event("serve", planned, measured))


_SERVE = [
    _opt("model", Path, "--model", default=..., help="Base model: an HF directory or a .gguf file."),
    _opt("adapters", list[str], "--adapter", default=[], help="NAME=DIRECTORY, repeatable: an adapter served under "
         "that model name (memfit runs and PEFT LoRA folders).", rich_help_panel="Adapters"),
    _opt("allow_runtime_adapters", bool, "--allow-runtime-adapters", default=False, help="Enable "
         "/v1/load_lora_adapter and /v1/unload_lora_adapter.", rich_help_panel="Adapters"),
    _opt("host", str, "--host", default="127.0.0.1", help="Address to listen on."),
    _opt("port", int, "--port", default=8000, help="Port to listen on."),
    _opt("plan", bool, "--plan/--no-plan", default=True, help="Plan the memory at the server's limits first "
         "(memfit plan --for serve, a few seconds) and print planned against measured when it stops."),
    _opt("metrics", Path | None, "--metrics", help="Append the server's end event (when it stops) to this JSONL "
         "file (created if absent): the peak and each memory component, planned and measured (memory_planned, "
         "memory_measured), as memfit finetune logs them in its metrics.jsonl.", rich_help_panel="Memory"),
    _opt("memory", str | None, "--memory", help="Fit in this much memory, e.g. '1GB': a smaller --kv-budget, then an "
         "NF4 base, then the layers streamed from disk (--weights-budget), as `memfit plan --for serve --memory` "
         "chooses.", rich_help_panel="Memory"),
    *field_params(ServeConfig, names=_SERVING + _MEMORY),
]
app.command("serve")(build_command(serve, _SERVE, """Serve a model and many adapters over the OpenAI HTTP API.

    /v1/completions and /v1/chat/completions ("model" picks the base or an adapter, "stream": true for server-sent
    events), /v1/models, /health and /metrics. Requests for different adapters share one continuous batch.

    Example: memfit serve --model runs/smollm2 --adapter sections=runs/lora --adapter-dir runs/adapters
    """))


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", help="The run to merge (memfit finetune or memfit train)."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged Hugging Face checkpoint."),
    model: Path | None = typer.Option(None, "--model", help="Base model (default: the one the run recorded)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Shard the safetensors above this size."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
) -> None:
    """Fold a run's adapter into the base weights and write a plain Hugging Face checkpoint.

    AutoModelForCausalLM.from_pretrained(OUT) loads it with no missing or unexpected keys and gives memfit's logits.
    DiffFit folds its scales, STABLE-RPS decompresses; Compacter cannot be merged (its bottleneck is nonlinear).
    """
    from memfit.train.merge import merge_run

    merge_run(adapter, out, model, overwrite=overwrite, max_shard_size=max_shard_size)
    typer.echo(f"wrote the merged model to {out}")


@app.command()
def convert(
    gguf: Path = typer.Option(..., "--gguf", help="A .gguf model file (llama.cpp's format)."),
    out: Path = typer.Option(..., "--out", help="Directory for the Hugging Face checkpoint (fp32 safetensors)."),
) -> None:
    """Write a GGUF model once as a Hugging Face directory (weights, config, tokenizer and chat template).

    Every command also takes the .gguf file directly as --model, dequantizing it at each start; the converted
    directory starts faster and can be streamed (--weights-budget).
    """
    from memfit.local import convert_gguf

    convert_gguf(gguf, out)
    typer.echo(f"wrote {out}")

