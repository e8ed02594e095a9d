"""`memfit moe ...`: run MoE models whose experts stay on disk; record routing; train a routing predictor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from memfit.errors import ConfigError
from memfit.local import load_tokenizer
from memfit.moe import POLICIES, PREDICTORS, PredictorConfig, RoutingPath, Trace, load
from memfit.moe.generate import cache_warning, check_token_ids, generate_requests, prompt_ids, timed_generate
from memfit.moe.loader import DEFAULT_BUDGET, DEFAULT_POLICY, DEFAULT_PREDICTOR
from memfit.moe.trace import read_texts, record, token_windows
from memfit.tiers.budget import format_size
from memfit.tiers.files import atomic_write

app = typer.Typer(
    help="Offloaded MoE inference: experts stay in the checkpoint on disk, read into a byte-budgeted cache, "
         "predicted and prefetched before they are needed.\n\n"
         "Typical flow: `memfit moe generate --model DIR --prompt TEXT` (training-free cross-layer prediction); "
         "for better prediction, `memfit moe trace` on in-domain text, `memfit moe train-predictor`, then "
         "`memfit moe generate --predictor predictor.safetensors`.",
    no_args_is_help=True,
)
_T = PredictorConfig()  # --help shows the defaults from where they are defined
console = Console()

MODEL = typer.Option(..., "--model", help="Hugging Face MoE model directory (config.json, safetensors, tokenizer).")
BUDGET = typer.Option(DEFAULT_BUDGET, "--expert-budget", "-b",
                      help="Expert bytes held in memory: a size ('3GB', '512MiB') or a share of all experts ('25%').")


def _policy_option(default: str):
    return typer.Option(default, "--policy", help=f"Cache policy: {', '.join(POLICIES)}.")


def _predictor_option(default: str):
    return typer.Option(default, "--predictor",
                        help=f"{', '.join(PREDICTORS)}, none, or a routing-path file from train-predictor.")


def _vocab_size(model_dir: Path) -> int | None:
    """The model's vocabulary size from its config.json, to check token ids before the model loads (None when
    the file is missing or odd: `load` then says what is wrong with it)."""
    try:
        size = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def _text_lines(path: Path) -> list[str]:
    """`path:line` of each text `read_texts` returns (it skips blank lines, so texts and lines do not line up)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()]


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=quiet, transient=True)


def stats_table(model, title: str = "Expert cache") -> Table:
    runtime = model.memfit_moe
    s = runtime.stats
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("experts cached", f"{runtime.cache.slots} of {len(runtime.store.keys())} "
                           f"({format_size(runtime.cache.nbytes)})"),
        ("policy / predictor", f"{runtime.policy.name} / {runtime.predictor.name if runtime.predictor else 'none'}"),
        ("expert accesses", str(s.accesses)),
        ("hit ratio", f"{s.hit_ratio:.1%} ({s.hits} hits, {s.late} late prefetches, {s.misses} misses)"),
        ("prefetch precision / recall", f"{s.precision:.1%} / {s.recall:.1%}"),
        ("bytes read", f"{format_size(s.bytes_read)} in {s.reads} reads ({s.read_gbps:.2f} GB/s)"),
        ("stalled on reads", f"{s.stall_s:.3f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command()
def generate(
    model: Path = MODEL,
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Text to continue."),
    prompts: Path | None = typer.Option(None, "--prompts", help='Offline batch: JSONL of {"prompt": ...} (or "text").'),
    out: Path | None = typer.Option(None, "--out", help="With --prompts: write completions here as JSONL, in input "
                                                        "order (default: print them)."),
    expert_budget: str = BUDGET,
    policy: str = _policy_option(DEFAULT_POLICY),
    predictor: str = _predictor_option(DEFAULT_PREDICTOR),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="With --prompts: requests per batch."),
    schedule: bool = typer.Option(False, "--schedule", help="With --prompts: regroup requests so each batch "
                                                            "activates fewer distinct experts."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
) -> None:
    """Generate text with the experts offloaded; print the text, tokens/s and cache statistics."""
    if (prompt is None) == (prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl.")
    if prompts is None and (schedule or out is not None):
        raise ConfigError("--schedule and --out apply to the requests of --prompts FILE.jsonl, not to --prompt.")
    texts = read_texts(prompts, ("prompt", "text")) if prompts is not None else []  # bad input fails before loading
    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(model, padding_side="left")  # generation pads on the left
    vocab = _vocab_size(model)
    if prompt is not None:
        ids = prompt_ids(tok, [prompt], ["--prompt"], vocab, error=ConfigError,
                         fix="pass some text, e.g. --prompt 'Once upon a time'.")[0].view(1, -1)
    else:
        prompt_ids(tok, texts, _text_lines(prompts), vocab, fix="give that line a prompt with text, or delete it.")
    lm = load(model, expert_budget, policy, predictor)
    try:
        warning = cache_warning(lm, 1 if prompt is not None else min(batch_size, len(texts)), expert_budget)
        if warning is not None:
            typer.echo(f"warning: {warning}", err=True)
        if not quiet:
            console.print(lm.memfit_moe.describe(), highlight=False, soft_wrap=True)
        if prompt is not None:
            out, timing = timed_generate(lm, ids, torch.ones_like(ids), max_new_tokens, pad_token_id=tok.pad_token_id)
            typer.echo(prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            speed = (f"{timing.new_tokens} tokens: prefill {timing.prefill_s:.2f} s, decode "
                     f"{timing.decode_tokens_per_s:.2f} tokens/s ({timing.tokens_per_s:.2f} tokens/s overall)")
        else:
            with _progress(quiet) as bar:
                task = bar.add_task("generating", total=len(texts))
                report = generate_requests(lm, tok, texts, batch_size, max_new_tokens, schedule,
                                           progress=lambda n: bar.advance(task, n))
            _write_completions(texts, report.completions, out)
            speed = (f"{report.new_tokens} tokens in {report.seconds:.2f} s: {report.tokens_per_s:.2f} tokens/s; "
                     f"{report.distinct_experts:.2f} distinct experts per layer per decode step "
                     f"({'scheduled' if schedule else 'input order'}, {len(report.batches)} batches)")
        if not quiet:
            console.print(speed, highlight=False, soft_wrap=True)
            console.print(stats_table(lm))
    finally:
        lm.memfit_moe.close()


def _write_completions(texts: list[str], completions: list[str], out: Path | None) -> None:
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in zip(texts, completions, strict=True)]
    if out is None:
        for line in lines:
            typer.echo(line)
    else:
        body = "\n".join(lines) + "\n"
        atomic_write(out, lambda f: f.write(body), mode="w")


@app.command()
def trace(
    model: Path = MODEL,
    text: Path = typer.Option(..., "--text", help="Text to route: .jsonl with a 'text' field, or plain text lines."),
    out: Path = typer.Option(..., "--out", help="Trace file to write (safetensors)."),
    seq_len: int = typer.Option(128, "--seq-len", min=8, help="Tokens per window (texts are joined and cut)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Stop after this many tokens."),
    expert_budget: str = typer.Option("50%", "--expert-budget", "-b", help="Expert cache while tracing."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Record which experts every MoE layer picks for every token of a text (the predictor's training data)."""
    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(model, padding_side="left")  # generation pads on the left
    windows = token_windows(tok, read_texts(text), seq_len)
    vocab = _vocab_size(model)
    if vocab is not None:
        check_token_ids(windows, vocab, str(text))
    if max_tokens is not None:
        windows = windows[: max(1, max_tokens // seq_len)]
    lm = load(model, expert_budget, "lru", None)
    try:
        with _progress(quiet) as bar:
            task = bar.add_task("tracing", total=windows.shape[0])
            result = record(lm, windows, batch_size, progress=lambda n: bar.advance(task, n))
    finally:
        lm.memfit_moe.close()
    result.save(out)
    if not quiet:
        console.print(f"wrote {out}: {result.tokens} tokens x {len(result.layers)} MoE layers "
                      f"({format_size(out.stat().st_size)})", highlight=False)


@app.command("train-predictor")
def train_predictor(
    trace_file: Path = typer.Option(..., "--trace", help="Trace from `memfit moe trace`."),
    out: Path = typer.Option(..., "--out", help="Predictor file to write (safetensors)."),
    eval_trace: Path | None = typer.Option(None, "--eval-trace", help="A trace of held-out text to report accuracy."),
    width: int = typer.Option(_T.width, "--width", min=8, help="Hidden width of the predictor MLP."),
    epochs: int = typer.Option(_T.epochs, "--epochs", min=1),
    lr: float = typer.Option(_T.lr, "--lr"),
    holdout: float = typer.Option(_T.holdout, "--holdout", min=0.0, max=0.5,
                                  help="Share of the trace's tail held out to report accuracy."),
    seed: int = typer.Option(_T.seed, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train the routing-path predictor: from a token's state at the first MoE layer, every later layer's experts."""
    data = Trace.load(trace_file)
    config = PredictorConfig(width=width, epochs=epochs, lr=lr, holdout=holdout, seed=seed)
    steps = epochs * (int(data.tokens * (1 - holdout)) // config.batch_size)
    with _progress(quiet) as bar:
        task = bar.add_task("training", total=steps)
        predictor = RoutingPath.train(data, config, progress=lambda loss: bar.update(
            task, advance=1, description=f"training (loss {loss:.4f})"))
    if eval_trace is not None:
        predictor.accuracy = predictor.accuracy_on(Trace.load(eval_trace))
    predictor.save(out)
    if not quiet and predictor.accuracy:
        table = Table(title=f"Routing-path predictor: top-{predictor.top_k} accuracy per layer "
                            f"({'held-out trace' if eval_trace else f'last {holdout:.0%} of the trace'})")
        table.add_column("MoE layer")
        table.add_column("accuracy", justify="right")
        for layer, acc in zip(predictor.layers[1:], predictor.accuracy, strict=True):
            table.add_row(str(layer), f"{acc:.1%}")
        console.print(table)
    if not quiet:
        console.print(f"wrote {out}", highlight=False)
