"""The allocator interface in real loops: transformers.Trainer, memfit's finetune with exact resume, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import peft
import pytest
import torch
from conftest import tiny_llama, write_jsonl

import memfit
from memfit.errors import ConfigError
from memfit.tiers.files import load_tensors
from memfit.train.allocation import plot_ranks, rank_grid
from memfit.train.callbacks import Callback
from memfit.train.config import TrainConfig
from memfit.train.finetune import finetune

INCRE = memfit.IncreLoRAConfig(target_modules=["q_proj", "v_proj"], init_rank=1, target_rank=2, top_h=4, rank_step=1,
                               t_init=2, interval=3)
ADA = memfit.AdaLoRAConfig(target_modules=["q_proj", "v_proj"], init_rank=4, target_rank=2, t_init=2, t_final=4,
                           interval=2)
TEXT = [{"text": t} for t in ["apache traffic server software developers kit", "puppet module for monit",
                              "awesome party music player", "print plugin for the gimp", "color picker tool",
                              "daemon that handles the userspace side", "common files for the web server",
                              "qt client for the music daemon"] * 4]


def _events(out, *kinds):
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] in kinds]


# -- transformers.Trainer ------------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 128, (12,), generator=gen) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.mark.parametrize("config", [replace(INCRE, top_h=2), ADA], ids=["increlora", "adalora"])
def test_hf_trainer_runs_the_allocator(tmp_path, config):
    from transformers import Trainer, TrainingArguments

    from memfit.integrations.hf import RankAllocatorCallback

    torch.manual_seed(0)
    model = memfit.inject(tiny_llama(), config)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=4)
    callback = RankAllocatorCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(48), callbacks=[callback])
    trainer.train()

    alloc, budget = callback.allocator, 2 * 4
    assert sum(alloc.ranks().values()) == budget == trainer.state.log_history[-1]["total_rank"]
    if isinstance(config, memfit.IncreLoRAConfig):
        assert [e["step"] for e in callback.events] == [3, 6]  # t_init 2, every 3 updates, 2 ranks per event
        # HF's two groups (with and without weight decay) and one per growth event, which HF's LambdaLR stepped
        assert len(trainer.optimizer.param_groups) == 4
        assert all(g["lr"] >= 0 for g in trainer.optimizer.param_groups)
    else:
        assert [e["step"] for e in callback.events] == [4, 6, 8]  # mask events, then the final budget at T - t_final
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
    # the orthogonality hook is gone after training; the model exports as a PEFT LoRA with the same logits
    x = _Rows(2).rows[0][None]
    model.train()
    assert torch.equal(model(input_ids=x, labels=x).loss, model.eval()(input_ids=x, labels=x).loss)
    memfit.export_peft(model, tmp_path / "peft")
    ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, model.eval()(x).logits, rtol=1e-5, atol=1e-6)


def test_hf_callback_refuses_a_model_without_adaptive_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    from memfit.integrations.hf import RankAllocatorCallback

    model = memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(8), callbacks=[RankAllocatorCallback()])
    with pytest.raises(ConfigError, match="'lora' adapter has fixed ranks"):
        trainer.train()


# -- memfit's finetune ---------------------------------------------------------------------------------------------
class _Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step):
        if step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("config, crash, optim", [(INCRE, 5, "adamw"), (INCRE, 5, "adamw8bit"),
                                                  (INCRE, 5, "offload-cpu"), (ADA, 7, "adamw")],
                         ids=["increlora", "increlora-adamw8bit", "increlora-offload-cpu", "adalora"])
def test_finetune_resume_continues_the_schedule_exactly(tmp_path, llama_dir, config, crash, optim):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, log_every=1, checkpoint_every=3, optim=optim)
    full = finetune(llama_dir, data, tmp_path / "full", config, cfg, quiet=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(llama_dir, data, tmp_path / "cut", config, cfg, callbacks=[_Crash(at=crash)], quiet=True)
    resumed = finetune(llama_dir, data, tmp_path / "cut", config, cfg, resume=True, quiet=True)

    assert [e["loss"] for e in _events(tmp_path / "cut", "train")] == [e["loss"] for e in _events(tmp_path / "full",
                                                                                                   "train")]
    changes = _events(tmp_path / "full", "grow", "mask")
    assert _events(tmp_path / "cut", "grow", "mask") == changes
    steps = [e["step"] for e in changes]
    assert steps == ([3, 6] if isinstance(config, memfit.IncreLoRAConfig) else [4, 6, 8])
    assert resumed["ranks"] == full["ranks"] and resumed["total_rank"] == full["total_rank"] == 2 * 8
    assert _events(tmp_path / "full", "end")[0]["ranks"] == full["ranks"]
    a = load_tensors(tmp_path / "full" / "adapter.safetensors")
    b = load_tensors(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "ranks.png").stat().st_size > 0


# -- bad input -----------------------------------------------------------------------------------------------------
def test_growing_method_refuses_disk_offloaded_optimizer_states(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    with pytest.raises(ConfigError, match="increlora adds parameters while it trains.*offload-disk"):
        finetune(llama_dir, data, tmp_path / "o", INCRE, TrainConfig(max_steps=4, optim="offload-disk"), quiet=True)


def test_allocator_on_a_model_without_adaptive_adapters():
    with pytest.raises(ConfigError, match="no memfit adapter; inject an adaptive one"):
        memfit.rank_allocator(tiny_llama())
    lora = memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"fixed ranks.*\['adalora', 'increlora'\]"):
        memfit.rank_allocator(lora, total_steps=10)


# -- the CLI -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, flags", [
    ("increlora", ["--init-rank", "1", "--target-rank", "2", "--t-init", "2", "--interval", "3", "--set", "top_h=4"]),
    ("adalora", ["--init-rank", "4", "--target-rank", "2", "--t-init", "2", "--t-final", "4", "--interval", "2"]),
])
def test_cli_finetune_prints_ranks_and_exports_them_to_peft(tmp_path, llama_dir, method, flags):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from memfit.cli import app
    from memfit.train.finetune import load_finetuned

    data, out = write_jsonl(tmp_path / "train.jsonl", TEXT), tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "--model", str(llama_dir), "--data", str(data), "--out", str(out),
                                      "--no-plan", "--method", method, "--targets", "q_proj,v_proj", "--epochs", "3",
                                      "--batch-size", "8", "--lr", "5e-3", *flags], terminal_width=200)
    assert result.exit_code == 0, result.output
    end = _events(out, "end")[0]
    assert end["total_rank"] == end["target_total_rank"] == 16 and sum(end["ranks"].values()) == 16
    assert "rank per module" in result.output and "total rank 16 of a budget of 16" in result.output
    assert "ranks.png" in result.output
    assert (out / "ranks.png").is_file()

    result = CliRunner().invoke(app, ["export", "--adapter", str(out), "--to", "peft", "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "peft").eval()
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in ref.named_modules()
             if isinstance(getattr(m, "r", None), dict) and "default" in m.r}
    assert ranks == {n: r for n, r in end["ranks"].items() if r > 0}
    x = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, load_finetuned(out)(x).logits, rtol=1e-5, atol=1e-6)


def test_cli_rank_flags_of_other_methods_are_refused(tmp_path, llama_dir):
    from typer.testing import CliRunner

    from memfit.cli import app

    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    result = CliRunner().invoke(app, ["finetune", "--no-plan", "--model", str(llama_dir), "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--method", "lora", "--target-rank", "4"])
    assert isinstance(result.exception, ConfigError) and "--target-rank does not apply to method 'lora'" in str(
        result.exception)


# -- the rank picture ----------------------------------------------------------------------------------------------
def test_rank_grid_names_kinds_uniquely_and_plots(tmp_path):
    llama = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 3,
             "model.layers.1.mlp.up_proj": 1}
    assert rank_grid(llama) == ([0, 1], ["q_proj", "up_proj"], [[2, None], [3, 1]])
    bert = {"bert.encoder.layer.0.attention.output.dense": 3, "bert.encoder.layer.0.output.dense": 1,
            "bert.encoder.layer.1.intermediate.dense": 4}
    assert rank_grid(bert) == ([0, 1], ["attention.output.dense", "output.dense", "intermediate.dense"],
                               [[3, 1, None], [None, None, 4]])
    assert plot_ranks(bert, tmp_path / "ranks.png", budget=9).read_bytes()[:4] == b"\x89PNG"
