"""`memfit quantize`: write a model's quantized checkpoint once."""

from __future__ import annotations

from pathlib import Path

import typer

from memfit.cli.app import app


@app.command()
def quantize(
    model: Path = typer.Option(..., "--model", help="An fp32/bf16 Hugging Face model directory (or a .gguf file)."),
    out: Path = typer.Option(..., "--out", help="Directory for the quantized checkpoint."),
    kind: str = typer.Option("nf4", "--kind", help="nf4 (QLoRA's 4-bit normal float) or int8 (symmetric)."),
    block_size: int = typer.Option(64, "--block-size", help="Weights per absmax scale."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant",
                                      help="Quantize the absmax scales too (8 bits, blocks of 256): 4.13 instead "
                                      "of 4.5 bits per NF4 weight."),
    skip: list[str] = typer.Option(None, "--skip", help="Module names kept in full precision (repeatable; default: "
                                   "the output heads lm_head, classifier, score, ...). Tied weights always are."),
    embeddings: bool = typer.Option(False, "--embeddings/--no-embeddings",
                                    help="Quantize the input embedding and the output head too (a tied head stays "
                                    "tied): for large vocabularies, where they are much of the frozen bytes; costs "
                                    "more quality than the Linear weights alone."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
) -> None:
    """Quantize every frozen Linear weight of a model once and write it as a memfit quantized checkpoint.

    Every command that takes --model (finetune, generate, serve) loads OUT quantized, without ever holding the fp32
    weights: NF4 with double quantization stores 0.13x the fp32 bytes of each Linear, int8 0.25x. Adapters train on
    top in fp32 and export to PEFT unchanged; `memfit merge` writes the merged model in full precision.

    Example: memfit quantize --model runs/smollm2 --out runs/smollm2-nf4
    """
    from memfit.quant import HEADS, QuantConfig
    from memfit.quant.checkpoint import quantize_checkpoint

    config = QuantConfig(kind=kind, block_size=block_size, double_quant=double_quant,
                         skip=list(skip) if skip else list(HEADS), embeddings=embeddings)
    quantize_checkpoint(model, out, config, overwrite=overwrite)
    typer.echo(f"wrote the {kind} checkpoint to {out}")
