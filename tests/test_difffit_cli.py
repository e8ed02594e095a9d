"""`memfit finetune --method difffit` on a tiny encoder: what is saved, reload, merge."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import memfit
from memfit.cli import app
from memfit.tiers.files import load_tensors
from memfit.train.finetune import load_finetuned

runner = CliRunner()



def test_finetune_difffit_saves_gammas_biases_norms_and_head(tmp_path, bert_dir, sections):
    train, val = sections
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--model", str(bert_dir), "--data", str(train), "--eval-data", str(val),
                                 "--no-plan", "--out", str(out), "--method", "difffit", "--set", 'placement=["mlp"]',
                                 "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "-q"])
    assert result.exit_code == 0, result.output
    saved = load_tensors(out / "adapter.safetensors")
    gammas = {k for k in saved if k.endswith(".gamma")}
    assert gammas == {f"bert.encoder.layer.{i}.output.dense.gamma" for i in range(6)}
    assert {"classifier.weight", "classifier.bias", "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.attention.self.query.bias"} <= set(saved)
    assert not any(k.endswith("query.weight") or k.endswith("word_embeddings.weight") for k in saved)
    assert any(not torch.equal(saved[k], torch.ones_like(saved[k])) for k in gammas)  # γ trained
    model = load_finetuned(out)
    x = torch.randint(5, 500, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
        memfit.merge(model)
        assert torch.allclose(model(input_ids=x).logits, before, rtol=1e-5, atol=1e-6)
