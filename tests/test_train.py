"""The fine-tuning loop: data checks, loss masking, metrics, outputs, exact resume, NaN guard, memory engine."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

import memfit
from memfit.errors import CheckpointError, DataError, TrainingError
from memfit.tiers.files import load_tensors
from memfit.train.callbacks import Callback
from memfit.train.config import TrainConfig
from memfit.train.data import load_rows
from memfit.train.finetune import finetune
from memfit.train.tasks import IGNORE, CausalLM, classification_metrics

TEXT = [{"text": t} for t in ["apache traffic server software developers kit", "puppet module for monit",
                              "awesome party music player", "print plugin for the gimp", "color picker tool",
                              "daemon that handles the userspace side", "common files for the web server",
                              "qt client for the music daemon"] * 4]
LORA = memfit.LoraConfig(r=4, dropout=0.1, target_modules=["q_proj", "v_proj"])


def _events(out, kind):
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


# -- data --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r":2: not valid JSON"),
    ('{"text": "a", "label": "x"}\n[1, 2]\n', r":2: expected a JSON object"),
    ('{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n', r':2: a classify row needs \{"text", "label"\}'),
    ('{"text": 3, "label": "x"}\n', r":1: field 'text' must be a string"),
])
def test_bad_data_files_name_the_line(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_rows(path, "classify")


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_task_is_guessed_from_fields(tmp_path):
    assert load_rows(write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 1}]))[1] == "classify"
    assert load_rows(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "completion": "y"}]))[1] == "causal-lm"


def test_eval_label_never_seen_in_training(tmp_path, bert_dir, sections):
    train, _ = sections
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a new kind of package", "label": "no-such-section"}])
    with pytest.raises(DataError, match=r"val.jsonl:1: label 'no-such-section' never occurs in the training data"):
        finetune(bert_dir, train, tmp_path / "out", memfit.LoraConfig(), eval_data=val, quiet=True)


def test_prompt_tokens_carry_no_loss(llama_dir):
    tokenizer = memfit.local.load_tokenizer(llama_dir)
    task = CausalLM()
    rows = [{"prompt": "puppet module", "completion": "for monit"}, {"text": "awesome party music player"}]
    rows, _ = load_rows(write_jsonl(llama_dir.parent / "pc.jsonl", rows))
    batch = task.collate([task.encode(r, tokenizer, 64) for r in rows], tokenizer.pad_token_id)
    n_prompt = len(tokenizer("puppet module")["input_ids"])
    completion = tokenizer("for monit", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert (batch["labels"][0, :n_prompt] == IGNORE).all()
    assert batch["labels"][0, n_prompt:n_prompt + len(completion)].tolist() == completion
    assert (batch["labels"][0, n_prompt + len(completion):] == IGNORE).all()  # padding
    assert batch["labels"][1, 0] != IGNORE  # plain text: every token is a target
    assert task.targets(batch) == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_classification_metrics_match_a_direct_count():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (300,), generator=gen).tolist()
    true = torch.randint(0, 4, (300,), generator=gen).tolist()
    f1s = []
    for c in range(5):  # per-class F1 by counting, over classes present in targets or predictions
        tp = sum(p == c and t == c for p, t in zip(pred, true, strict=True))
        fp, fn = sum(p == c for p in pred) - tp, sum(t == c for t in true) - tp
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    got = classification_metrics(pred, true, 5)
    assert got["accuracy"] == pytest.approx(sum(p == t for p, t in zip(pred, true, strict=True)) / 300)
    assert got["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))


# -- end to end ------------------------------------------------------------------------------------------------
def test_causal_lm_finetune_writes_adapter_metrics_and_plot(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, log_every=1)
    summary = finetune(llama_dir, data, tmp_path / "out", LORA, cfg, eval_data=data, quiet=True)
    out = tmp_path / "out"
    assert (out / "adapter.safetensors").is_file() and (out / "loss.png").stat().st_size > 0
    losses = [e["loss"] for e in _events(out, "train")]
    assert len(losses) == 12 and losses[-1] < losses[0]
    evals = _events(out, "eval")
    assert [e["step"] for e in evals] == [4, 8, 12]  # per epoch; the last one is the final evaluation
    assert summary["eval_loss"] == evals[-1]["loss"] < evals[0]["loss"]
    assert summary["trainable_params"] == sum(4 * (32 + n) for n in (32, 16)) * 4  # q: 32->32, v: 32->16, 4 layers
    base = memfit.train.finetune.load_base(llama_dir, CausalLM())[0]
    reloaded = memfit.load_adapter(base, out)
    saved = load_tensors(out / "adapter.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in memfit.adapters.adapter_state_dict(reloaded).items())


def test_classification_trains_head_and_saves_labels(tmp_path, bert_dir, sections):
    train, val = sections
    summary = finetune(bert_dir, train, tmp_path / "out", memfit.LoraConfig(r=4),
                       TrainConfig(epochs=2, batch_size=32, lr=1e-2), eval_data=val, quiet=True)
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(summary)
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["config"]["modules_to_save"] == ["classifier"] and meta["task"] == "classify"
    assert meta["labels"] == sorted({json.loads(x)["label"] for x in train.read_text().splitlines()})
    assert "classifier.weight" in load_tensors(tmp_path / "out" / "adapter.safetensors")


class _Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step):
        if step == self.at:
            raise RuntimeError("simulated crash")


def crash_and_resume(model_dir, data, tmp_path, adapter, cfg, at: int = 8) -> tuple[dict, dict]:
    """The run uninterrupted in tmp_path/full, and crashed after update `at` then resumed in tmp_path/cut: the
    two must log the same losses and write bitwise the same adapter. Returns both summaries and the tensors."""
    full = finetune(model_dir, data, tmp_path / "full", adapter, cfg, quiet=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(model_dir, data, tmp_path / "cut", adapter, cfg, callbacks=[_Crash(at=at)], quiet=True)
    resumed = finetune(model_dir, data, tmp_path / "cut", adapter, cfg, resume=True, quiet=True)
    assert resumed["step"] == full["step"]
    assert [e["loss"] for e in _events(tmp_path / "cut", "train")] == [e["loss"] for e in _events(tmp_path / "full",
                                                                                                   "train")]
    a, b = (load_tensors(tmp_path / run / "adapter.safetensors") for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return full, a


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "offload-disk"])
def test_resume_continues_the_interrupted_run_exactly(tmp_path, llama_dir, optim):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, log_every=1, checkpoint_every=3, optim=optim)
    full, _ = crash_and_resume(llama_dir, data, tmp_path, LORA, cfg)
    assert full["step"] == 12


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune(llama_dir, data, tmp_path / "none", LORA, TrainConfig(max_steps=2), resume=True, quiet=True)
    finetune(llama_dir, data, tmp_path / "out", LORA, TrainConfig(max_steps=4, checkpoint_every=2), quiet=True)
    with pytest.raises(CheckpointError, match=r"other settings \{'lr'"):
        finetune(llama_dir, data, tmp_path / "out", LORA, TrainConfig(max_steps=4, checkpoint_every=2, lr=1.0),
                 resume=True, quiet=True)
    with pytest.raises(CheckpointError, match="holds a 'lora' adapter"):
        finetune(llama_dir, data, tmp_path / "out", memfit.LoraConfig(r=2, target_modules=["q_proj"]),
                 TrainConfig(max_steps=4, checkpoint_every=2), resume=True, quiet=True)


class _Poison(Callback):
    def loss(self, trainer, loss):
        return loss * float("nan") if trainer.global_step == 2 else loss


def test_nan_loss_stops_with_a_clear_error(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    with pytest.raises(TrainingError, match=r"loss is nan at update 3 \(lr .*Lower --lr \(now 0.0005\)"):
        finetune(llama_dir, data, tmp_path / "out", LORA, TrainConfig(max_steps=5), callbacks=[_Poison()],
                 quiet=True)


def test_streamed_weights_give_the_same_losses(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    cfg = TrainConfig(max_steps=4, batch_size=8, lr=5e-3, log_every=1)
    finetune(llama_dir, data, tmp_path / "mem", LORA, cfg, quiet=True)
    base = memfit.train.finetune.load_base(llama_dir, CausalLM())[0]
    layer = sum(p.numel() * 4 for p in base.model.layers[0].parameters())
    resident = sum(p.numel() * 4 for n, p in base.named_parameters() if ".layers." not in n)
    resident += sum(b.numel() * b.element_size() for b in base.buffers())
    budget = resident + 2 * layer + 64  # the two-layer window beside the resident part, with the vocabulary
    summary = finetune(llama_dir, data, tmp_path / "stream", LORA,
                       TrainConfig(**{**cfg.to_dict(), "weights_budget": str(budget)}), quiet=True)
    # The (untied) embedding streams by rows, which frees room for one layer; the head fits, so it stays resident
    # and the loss is the plain one: bitwise the in-memory losses.
    embedding = base.model.embed_tokens.weight.numel() * 4
    assert summary["stream"]["vocab"] == embedding and summary["stream"]["streamed"] == 3 * layer + embedding
    assert summary["stream"]["bytes_read"] >= 4 * 3 * layer
    assert [e["loss"] for e in _events(tmp_path / "stream", "train")] == [e["loss"] for e in _events(tmp_path / "mem",
                                                                                                      "train")]
