"""`memfit merge`: a plain HF checkpoint, loaded by transformers with no missing or unexpected keys, same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import memfit
from memfit.adapters import get_method, methods
from memfit.cli import app
from memfit.errors import ConfigError
from memfit.train.config import TrainConfig
from memfit.train.finetune import finetune, load_finetuned
from memfit.train.merge import merge_run

TEXT = [{"text": t} for t in ["apache traffic server software developers kit", "puppet module for monit",
                              "awesome party music player", "print plugin for the gimp"] * 8]
CONFIGS = {"mos": memfit.MoSConfig(r=4, r_eq=2, r_pri=1, shards=2),
           "compacter": memfit.CompacterConfig(n=2, reduction=8),
           "adalora": memfit.AdaLoRAConfig(init_rank=4, target_rank=2)}


@pytest.fixture(params=list(methods()))
def run(request, tmp_path, llama_dir):
    name = request.param
    config = CONFIGS.get(name, get_method(name).config_cls())
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    out = tmp_path / "run"
    finetune(llama_dir, data, out, config, TrainConfig(max_steps=3, lr=2e-2, batch_size=8), quiet=True)
    return name, out


def test_merged_checkpoint_loads_cleanly_with_the_same_logits(run, tmp_path):
    name, out = run
    if get_method(name).merge_error and not get_method(name).from_scratch:
        with pytest.raises(ConfigError, match="cannot be merged"):
            merge_run(out, tmp_path / "merged")
        return
    merge_run(out, tmp_path / "merged")
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    keys = set(merged.state_dict())
    assert not any("memfit" in k or "lora_" in k or "idx_" in k for k in keys)
    x = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_finetuned(out)(input_ids=x).logits
        assert torch.allclose(merged.eval()(input_ids=x).logits, expected, rtol=1e-4, atol=1e-5)


def test_merge_cli_refuses_to_overwrite_and_says_why_compacter_cannot(tmp_path, llama_dir):
    runner = CliRunner()
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    finetune(llama_dir, data, tmp_path / "run", memfit.LoraConfig(r=2), TrainConfig(max_steps=1), quiet=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "taken")])
    assert isinstance(result.exception, ConfigError) and "--overwrite" in str(result.exception)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0 and (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "tokenizer.json").is_file()
