"""JSONL training data: read with line-numbered errors, check each row's fields, guess the task.

Row formats (one JSON object per line):
    causal-lm   {"text": ...}  or  {"prompt": ..., "completion": ...}  (loss on the completion only)
    classify    {"text": ..., "label": ...}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfit.errors import DataError

TASK_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "causal-lm": (("text",), ("prompt", "completion")),
    "classify": (("text", "label"),),
}


@dataclass(frozen=True)
class Row:
    """One example and where it came from (for error messages)."""

    data: dict[str, Any]
    line: int


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """Every non-blank line of `path` as a JSON object; a DataError names the file and line of any problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist. Pass a JSONL file (one JSON object per line).")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory. Pass a JSONL file (one JSON object per line).")
    rows = []
    # Any readable file: a regular file, a pipe or a process substitution (read once, front to back).
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}.") from e
    with f:
        for number, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}). "
                                "Each line must be one JSON object.") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}.")
            rows.append(Row(obj, number))
    if not rows:
        raise DataError(f"{path} is empty: it holds no JSON lines. Point --data at a file with examples.")
    return rows


def _lines(f: Any, path: Path) -> Any:
    number = 0
    try:
        for number, line in enumerate(f, start=1):  # noqa: B007 (the count names the line of a decoding error)
            yield number, line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{number + 1}: not UTF-8 text ({e.reason}). Save the file as UTF-8.") from e


def guess_task(rows: list[Row]) -> str:
    """'classify' if the first row has a label, else 'causal-lm'."""
    return "classify" if "label" in rows[0].data else "causal-lm"


def check_rows(rows: list[Row], task: str, path: str | os.PathLike) -> None:
    """Every row has one of the task's field sets, each a string (labels may be ints)."""
    if task not in TASK_FIELDS:
        raise DataError(f"unknown task {task!r}; choose one of {sorted(TASK_FIELDS)}.")
    allowed = TASK_FIELDS[task]
    for row in rows:
        fields = next((f for f in allowed if all(k in row.data for k in f)), None)
        if fields is None:
            want = " or ".join("{" + ", ".join(f'"{k}"' for k in f) + "}" for f in allowed)
            raise DataError(f"{path}:{row.line}: a {task} row needs {want}; this one has keys {sorted(row.data)}.")
        for key in fields:
            value = row.data[key]
            ok = isinstance(value, str) or (key == "label" and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise DataError(f"{path}:{row.line}: field {key!r} must be a string, got {type(value).__name__}.")


def label_names(rows: list[Row]) -> list[str]:
    """The label vocabulary of the training rows, sorted (labels are compared as strings)."""
    return sorted({str(r.data["label"]) for r in rows})


def check_labels(rows: list[Row], labels: list[str], path: str | os.PathLike) -> None:
    known = set(labels)
    for row in rows:
        if str(row.data["label"]) not in known:
            raise DataError(f"{path}:{row.line}: label {row.data['label']!r} never occurs in the training data "
                            f"(known labels: {labels}). Add examples of it to the training file or drop the row.")


def load_rows(path: str | os.PathLike, task: str | None = None) -> tuple[list[Row], str]:
    """Read and check a data file; returns the rows and the task (guessed from the first row if None)."""
    rows = read_jsonl(path)
    task = task or guess_task(rows)
    check_rows(rows, task, path)
    return rows, task
