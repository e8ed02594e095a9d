"""`memfit finetune --method compacter` on a tiny encoder: slow weights saved once, reload gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memfit.cli import app
from memfit.local import load_tokenizer
from memfit.tiers.files import load_tensors
from memfit.train.data import load_rows
from memfit.train.finetune import load_finetuned
from memfit.train.tasks import Classify

runner = CliRunner()



@pytest.mark.parametrize("placement, per_block", [("attention,mlp", 2), ("mlp", 1)])  # Compacter, Compacter++
def test_finetune_compacter_and_reload(tmp_path, bert_dir, sections, placement, per_block):
    train, val = sections
    out = tmp_path / "run"
    sets = ["--set", f"placement={json.dumps(placement.split(','))}", "--set", "reduction=4"]
    result = runner.invoke(app, ["finetune", "--model", str(bert_dir), "--data", str(train), "--eval-data", str(val),
                                 "--no-plan", "--out", str(out), "--method", "compacter", *sets, "--epochs", "1",
                                 "--batch-size", "32", "--lr", "1e-2", "-q"])
    assert result.exit_code == 0, result.output
    saved = load_tensors(out / "adapter.safetensors")
    assert [k for k in saved if k.endswith(".A")] == ["memfit_shared.A"]
    assert saved["memfit_shared.A"].shape == (4, 4, 4)
    fast = [k for k in saved if ".adapter_" in k]
    assert len(fast) == 6 * per_block * 4  # blocks × adapters × (down s, t, up s, t)
    # The reloaded adapter scores the eval set exactly as the run's final evaluation did.
    model = load_finetuned(out)
    meta = json.loads((out / "adapter_config.json").read_text())
    task, tokenizer = Classify(meta["labels"]), load_tokenizer(bert_dir)
    rows = load_rows(val, "classify")[0]
    batch = task.collate([task.encode(r, tokenizer, 128) for r in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        accuracy = (model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
                    == batch["labels"]).float().mean().item()
    end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert accuracy == pytest.approx(end["eval_accuracy"], abs=1e-6)
    assert torch.equal(model.memfit_shared.A, saved["memfit_shared.A"])
