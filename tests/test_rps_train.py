"""`memfit train --method rps`: from-scratch training of compressed models through the trainer and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer, write_jsonl
from safetensors import safe_open
from typer.testing import CliRunner

import memfit
from memfit.cli import app
from memfit.errors import ConfigError
from memfit.local import load_tokenizer
from memfit.tiers.files import load_tensors
from memfit.train.callbacks import Callback
from memfit.train.config import TrainConfig
from memfit.train.data import Row
from memfit.train.finetune import finetune, load_finetuned
from memfit.train.tasks import CausalLM

DATA = Path(__file__).resolve().parent.parent / "data"
runner = CliRunner()


def _events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]



@pytest.fixture(scope="module")
def text(tmp_path_factory) -> tuple[Path, Path]:
    """Real text: the synopses of the shipped data as causal-LM rows."""
    rows = [{"text": json.loads(x)["text"]} for x in (DATA / "debian-sections-train.jsonl").read_text().splitlines()]
    root = tmp_path_factory.mktemp("text")
    return write_jsonl(root / "train.jsonl", rows[:320]), write_jsonl(root / "val.jsonl", rows[-64:])


def test_cli_trains_a_causal_lm_at_10x_and_the_saved_model_reloads(tmp_path, llama_dir, text):
    train, val = text
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(llama_dir), "--data", str(train), "--eval-data", str(val),
                                 "--out", str(out), "--compression", "0.1", "--epochs", "2", "--batch-size", "16",
                                 "--lr", "1e-2", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert "shared memory z" in result.output and "10.0× compressed" in result.output
    losses = [e["loss"] for e in _events(out, "train")]
    evals = _events(out, "eval")
    assert losses[-1] < losses[0] - 1.0 and evals[-1]["loss"] < evals[0]["loss"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "rps" and meta["from_scratch"]
    with safe_open(out / "adapter.safetensors", "pt") as f:
        (m,) = f.get_slice("memfit_shared.z").get_shape()
        assert not any(k.endswith("proj.weight") for k in f.keys())  # noqa: SIM118  (safe_open is not iterable); only z stands for the Linear weights
    model = load_finetuned(out)
    assert m == memfit.rps_footprint(model)["z_params"] == round(0.1 * memfit.rps_footprint(model)["compressed_params"])
    # The reloaded model scores the eval set exactly as the run's final evaluation did.
    task, tokenizer = CausalLM(), load_tokenizer(llama_dir)
    rows = [json.loads(x) for x in val.read_text().splitlines()]
    batch = task.collate([task.encode(Row(r, i), tokenizer, 128) for i, r in enumerate(rows)], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = task.loss_sum(model, batch).item() / task.targets(batch)
    assert loss == pytest.approx(evals[-1]["loss"], rel=1e-5)


class _Crash(Callback):
    def on_step_end(self, trainer, step):
        if step == 5:
            raise RuntimeError("simulated crash")


def test_classification_from_scratch_resumes_exactly(tmp_path, bert_dir, sections):
    train, val = sections
    rps = memfit.RPSConfig(compression=0.25)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=5e-3, log_every=1, checkpoint_every=3)
    full = finetune(bert_dir, train, tmp_path / "full", rps, cfg, eval_data=val, quiet=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(bert_dir, train, tmp_path / "cut", rps, cfg, eval_data=val, callbacks=[_Crash()],
                           quiet=True)
    resumed = finetune(bert_dir, train, tmp_path / "cut", rps, cfg, eval_data=val, resume=True, quiet=True)
    assert [e["loss"] for e in _events(tmp_path / "cut", "train")] == [e["loss"] for e in _events(tmp_path / "full",
                                                                                                   "train")]
    assert resumed["eval_accuracy"] == full["eval_accuracy"] and "eval_macro_f1" in full
    a = load_tensors(tmp_path / "full" / "adapter.safetensors")
    b = load_tensors(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["footprint"]["z_params"] == round(0.25 * full["footprint"]["compressed_params"])
    assert full["trainable_params"] == full["total_params"]  # everything trains, z counted once


def test_methods_go_to_their_command(tmp_path, llama_dir, text):
    train, _ = text
    common = ["--model", str(llama_dir), "--data", str(train), "--max-steps", "1", "-q"]
    result = runner.invoke(app, ["finetune", *common, "--out", str(tmp_path / "a"), "--method", "rps"])
    assert isinstance(result.exception, ConfigError) and "use `memfit train --method rps`" in str(result.exception)
    result = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "b"), "--method", "lora"])
    assert isinstance(result.exception, ConfigError) and "use `memfit finetune --method lora`" in str(result.exception)
    result = runner.invoke(app, ["train", "--model", str(llama_dir), "--data", str(train), "--out", str(tmp_path / "c"),
                                 "--compression", "1.5"])
    assert isinstance(result.exception, ConfigError) and "must be in (0, 1]" in str(result.exception)
    assert "rps" not in runner.invoke(app, ["finetune", "--help"]).output.split("Method:")[1].split("(")[0]


def test_a_vocabulary_larger_than_the_model_is_refused(tmp_path, text):
    from transformers import LlamaConfig

    model_dir = tmp_path / "small-vocab"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(model_dir)
    word_tokenizer(model_dir)  # 500 words
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the model's vocab_size is 64"):
        finetune(model_dir, text[0], tmp_path / "out", memfit.RPSConfig(), TrainConfig(max_steps=1),
                           quiet=True)
