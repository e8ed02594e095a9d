"""Check that README.md's benchmark tables are what the benchmarks measured: each table between markers

    <!-- results/<name>.json: <table id> -->
    | ... the table ... |
    <!-- /results -->

must equal `readme_tables(payload)[<table id>]` of bench/<name>.py (results/quality-lm.json: bench/quality.py),
rendered from the committed results/<name>.json. So no README figure is typed by hand or left from an older run.

    .venv/bin/python bench/readme_check.py                 # exit 1 listing every mismatch or missing file
    .venv/bin/python bench/readme_check.py --write         # rewrite the marked tables from results/
    .venv/bin/python bench/readme_check.py --results DIR   # results from elsewhere (e.g. another machine's run)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OPEN = re.compile(r"^<!-- results/(?P<file>[A-Za-z0-9_.-]+\.json): (?P<table>[A-Za-z0-9_.-]+) -->$")
CLOSE = "<!-- /results -->"
SCRIPTS = {"quality-lm.json": "quality.py"}  # results files not named after the script that writes them


def script_of(results_file: str) -> str:
    """bench/quality_llm.py writes quality-llm.json and quality-llm-<steps>steps.json, bench/optim_ab.py any
    optim_ab*.json (--name), bench/optim.py optim.json and optim-<machine>.json (--name)."""
    if results_file.startswith("quality-llm"):
        return "quality_llm.py"
    if results_file.startswith("optim_ab"):  # bench/optim_ab.py --name optim_ab_<what>
        return "optim_ab.py"
    if results_file.startswith("optim-"):  # bench/optim.py --name optim-<machine>
        return "optim.py"
    return SCRIPTS.get(results_file, results_file.removesuffix(".json") + ".py")

Renderer = Callable[[dict], dict[str, str]]


@dataclass(frozen=True)
class Block:
    """One marked table: README lines [start, end) are the table, lines start - 1 and end the markers."""

    file: str
    table: str
    start: int
    end: int

    def text(self, lines: list[str]) -> str:
        return "\n".join(lines[self.start:self.end])


def blocks(lines: list[str]) -> list[Block]:
    """The marked tables of a README; a marker out of place is an error, not a block silently skipped."""
    out, opened = [], None
    for i, line in enumerate(lines):
        m = OPEN.match(line.rstrip())
        if m or line.startswith("<!-- results/"):
            if not m:
                raise ValueError(f"line {i + 1}: malformed marker {line!r}")
            if opened is not None:
                raise ValueError(f"line {i + 1}: marker inside the block opened on line {opened[0] + 1}")
            opened = (i, m["file"], m["table"])
        elif line.rstrip() == CLOSE:
            if opened is None:
                raise ValueError(f"line {i + 1}: {CLOSE} without an opening marker")
            out.append(Block(opened[1], opened[2], opened[0] + 1, i))
            opened = None
    if opened is not None:
        raise ValueError(f"line {opened[0] + 1}: marker never closed by {CLOSE}")
    return out


@functools.cache
def script_renderer(results_file: str) -> Renderer:
    """`readme_tables` of the bench script that writes `results_file`, imported by path (the scripts are no package;
    they keep torch and memfit out of their top level, so this is cheap)."""
    script = BENCH / script_of(results_file)
    spec = importlib.util.spec_from_file_location(f"_readme_check_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.readme_tables


def _lines(text: str) -> list[str]:
    """Trailing whitespace and blank lines at either end do not count."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _tables(path: Path, renderers: Mapping[str, Renderer] | None) -> dict[str, str] | str:
    """The tables rendered from one results file, or why there are none."""
    if not path.is_file():
        return f"missing results file {path}"
    if renderers is not None and path.name not in renderers:
        return f"no renderer for {path.name}"
    try:
        payload = json.loads(path.read_text())
        return (renderers[path.name] if renderers is not None else script_renderer(path.name))(payload)
    except Exception as e:  # noqa: BLE001 (reported; the other blocks are still checked)
        return f"cannot render: {type(e).__name__}: {e}"


def _render(readme: Path, results_dir: Path, renderers: Mapping[str, Renderer] | None
            ) -> tuple[list[str], dict[Block, list[str]]]:
    """(problems, the rendered lines of each block that could be rendered)."""
    lines = readme.read_text().splitlines()
    try:
        found = blocks(lines)
    except ValueError as e:
        return [f"{readme}: {e}"], {}
    problems, rendered, tables = [], {}, {}
    for block in found:
        where = f"{readme.name}:{block.start}: results/{block.file}: {block.table}"
        if block.file not in tables:
            tables[block.file] = _tables(results_dir / block.file, renderers)
        got = tables[block.file]
        if isinstance(got, str):
            problems.append(f"{where}: {got}")
        elif block.table not in got:
            problems.append(f"{where}: no such table (bench script renders: {', '.join(got)})")
        else:
            rendered[block] = _lines(got[block.table])
    return problems, rendered


def check(readme: Path, results_dir: Path, renderers: Mapping[str, Renderer] | None = None) -> list[str]:
    """Every problem of the README's marked tables: missing results, unknown tables, and for each table whose text
    differs from its rendering, the first differing line. `renderers` maps results file name to renderer (default:
    each bench script's `readme_tables`)."""
    problems, rendered = _render(readme, results_dir, renderers)
    lines = readme.read_text().splitlines()
    for block, want in rendered.items():
        have = _lines(block.text(lines))
        for k in range(max(len(have), len(want))):
            a = have[k] if k < len(have) else "<end of table>"
            b = want[k] if k < len(want) else "<end of table>"
            if a != b:
                problems.append(f"{readme.name}:{block.start + 1 + k}: results/{block.file}: {block.table}: "
                                f"table line {k + 1}: README has {a!r}, results give {b!r}")
                break
    return problems


def write(readme: Path, results_dir: Path, renderers: Mapping[str, Renderer] | None = None) -> list[str]:
    """Rewrite every marked table that renders from its results; returns the problems of those that do not (their
    text is left alone)."""
    problems, rendered = _render(readme, results_dir, renderers)
    lines = readme.read_text().splitlines()
    for block in sorted(rendered, key=lambda b: b.start, reverse=True):  # bottom up: indices above stay valid
        lines[block.start:block.end] = rendered[block]
    text = "\n".join(lines) + "\n"
    if text != readme.read_text():
        readme.write_text(text)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="directory of the <name>.json files")
    ap.add_argument("--write", action="store_true", help="rewrite the marked tables from the results")
    args = ap.parse_args(argv)
    problems = (write if args.write else check)(args.readme, args.results)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"README tables {'rewritten from' if args.write else 'match'} {args.results.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
