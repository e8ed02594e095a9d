"""`memfit ...` commands. Thin by design: parse, call the library, print.

Each command lives in its own module and registers on `memfit.cli.app.app` (or is a sub-app added here).
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from memfit.cli import demo, export, finetune, moe, plan, quantize, serve  # noqa: F401  (importing registers the commands)
from memfit.cli.app import app
from memfit.errors import MemfitError

app.add_typer(moe.app, name="moe")

__all__ = ["app", "main"]


@app.command()
def version() -> None:
    """Print memfit's version and the versions of the libraries it runs on."""
    import torch
    import transformers

    from memfit import __version__

    typer.echo(f"memfit {__version__} (torch {torch.__version__}, transformers {transformers.__version__})")


def main() -> None:
    """Entry point: memfit's own errors are bad input, so they print as one clear line, not a traceback."""
    # bitsandbytes (an optional benchmark baseline that PEFT imports when present) warns on every start about an
    # optional CPU kernel package; it is not ours to act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    code: int | str | None = 0
    try:
        app()
    except MemfitError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        code = 2
    except SystemExit as e:  # typer ends every command this way
        code = e.code
    from memfit.train.distributed import exit_worker, launched_by_torchrun

    if launched_by_torchrun():  # its exit must not abort in gloo's teardown
        exit_worker(code)
    sys.exit(code)
