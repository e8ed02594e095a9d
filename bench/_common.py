"""Helpers shared by the benchmark scripts: peak-memory probes, result tables and JSON output."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from memfit.tiers.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: F401 (re-exported)

RESULTS = Path(__file__).resolve().parent.parent / "results"


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(name: str, title: str, columns: list[str], rows: list[list], payload: dict) -> Path:
    """Print a rich table and write results/<name>.json."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # logs keep whole rows
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
