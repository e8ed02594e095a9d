"""Models without weights: moving parameters and buffers together, loading the resident rest by key."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama

import memfit
from memfit.errors import CheckpointError
from memfit.tiers.modules import empty_weights, load_resident, move_model
from memfit.tiers.st_reader import SafetensorsReader


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_move_model_leaves_nothing_behind(make):
    """The --weights-budget GPU bug: parameters moved, buffers (BERT's position_ids) left on the CPU. Moving to the
    meta device shows what any device move would leave behind."""
    model = make()
    memfit.inject(model, memfit.LoraConfig(r=2))
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight if hasattr(
        model, "get_output_embeddings") and model.get_output_embeddings() is not None else None
    move_model(model, "meta")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    assert left == [] and any(True for _ in model.buffers())
    if tied:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_load_resident_fills_a_meta_model_and_checks_shapes(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    with empty_weights():
        empty = type(llama)(llama.config)
    with SafetensorsReader(tmp_path, drop_cache=False) as reader:
        load_resident(empty, reader)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(empty(input_ids=x).logits, llama(input_ids=x).logits)
    wrong = type(llama)(llama.config.__class__(**{**llama.config.to_dict(), "intermediate_size": 48}))
    with SafetensorsReader(tmp_path, drop_cache=False) as reader, pytest.raises(CheckpointError, match="shape"):
        load_resident(wrong.to("meta"), reader)
