"""Fine-tuning through offloaded experts equals fine-tuning the same model fully in memory.

The reference is the model object that wrote the checkpoint, trained by plain autograd through transformers'
own experts (an independent code path: no memfit expert code runs in it). Both get the same seeded LoRA and the
same AdamW; over 20 updates every loss and every adapter gradient must agree (max |ours - ref| / max |ref|
<= 1e-5), for every family, at a budget that churns the cache (12.5%: fewer slots than one layer's experts for a
batch) and one that keeps most of it (50%).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import write_jsonl
from peft import PeftModel
from test_moe_models import CONFIGS, TEXTS, VOCAB, one_thread, save, save_tokenizer, tiny_moe  # noqa: F401

import memfit
import memfit.moe as moe
from memfit.errors import ConfigError
from memfit.quant import QuantConfig, quantize
from memfit.quant.checkpoint import save_quantized
from memfit.train.config import TrainConfig
from memfit.train.finetune import finetune, load_finetuned

TOL = 1e-5
STEPS = 20


def lora(arch: str) -> memfit.LoraConfig:
    # DeepSeek-V3's attention has no q_proj/v_proj (MLA): all-linear covers its projections and shared experts
    return memfit.LoraConfig(r=4, alpha=8, target_modules="all-linear" if arch == "deepseek_v3" else
                             ["q_proj", "v_proj", "o_proj"])


def batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (4, 12), generator=g) for _ in range(n)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale or 1.0)


def train_both(ref, ours, arch: str, steps: int = STEPS) -> list[tuple[float, float]]:
    """Train both models in lockstep; returns (loss error, worst gradient error) per update."""
    for model in (ref, ours):
        torch.manual_seed(7)
        memfit.inject(model, lora(arch))
        model.train()
    opts = [torch.optim.AdamW(trainable(m).values(), lr=5e-3) for m in (ref, ours)]
    errors = []
    for ids in batches(steps):
        losses = []
        for model, opt in zip((ref, ours), opts, strict=True):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        a, b = trainable(ref), trainable(ours)
        assert a.keys() == b.keys() and a
        errors.append((rel(losses[1], losses[0]), max(rel(b[n].grad, a[n].grad) for n in a)))
        for opt in opts:
            opt.step()
    return errors


@pytest.mark.parametrize("budget", ["12.5%", "50%"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_training_through_offloaded_experts_matches_in_memory(tmp_path, arch, budget):
    ref = tiny_moe(arch)
    ours = moe.load(save(ref, tmp_path / "ckpt"), expert_budget=budget)
    try:
        errors = train_both(ref, ours, arch)
        phases = ours.memfit_moe.phase_summary()
    finally:
        ours.memfit_moe.close()
    assert max(e[0] for e in errors) <= TOL and max(e[1] for e in errors) <= TOL, errors
    # gradients reached the first layer's adapters through every MoE layer's experts
    assert any(p.grad.abs().max() > 0 for n, p in trainable(ours).items() if ".layers.0." in n)
    assert phases["backward"]["hits"] + phases["backward"]["late"] + phases["backward"]["misses"] > 0


def test_a_wrong_backward_is_caught(tmp_path, monkeypatch):
    """The parity check can fail: a backward that scales its input gradient by 1.001 is far outside it."""
    from memfit.moe import experts

    real = experts.expert_mlp_grad

    def skewed(*args):
        y, dx = real(*args)
        return y, dx * 1.001

    monkeypatch.setattr(experts, "expert_mlp_grad", skewed)
    ref = tiny_moe("mixtral")
    ours = moe.load(save(ref, tmp_path / "ckpt"), expert_budget="25%")
    try:
        errors = train_both(ref, ours, "mixtral", steps=1)
    finally:
        ours.memfit_moe.close()
    assert errors[0][1] > 1e-4


def test_quantized_base_trains_like_the_in_memory_quantized_model(tmp_path):
    """A `memfit quantize` checkpoint: NF4 experts in the cache, their input gradients through the codes."""
    ref = quantize(tiny_moe("qwen3_moe"), QuantConfig(kind="nf4")).eval()
    save_quantized(ref, tmp_path / "q")
    ours = moe.load(tmp_path / "q", expert_budget="25%")
    try:
        errors = train_both(ref, ours, "qwen3_moe", steps=5)
    finally:
        ours.memfit_moe.close()
    assert max(max(e) for e in errors) <= TOL, errors


def test_backward_reads_are_prefetched_when_the_budget_allows(tmp_path, monkeypatch):
    """At 50% the last layer's experts are still resident when the backward starts and the earlier layers' are
    read while later ones compute: after the first update, the backward finds almost everything in memory.

    Each expert's backward is slowed by 5 ms, so that the claim is about the plan (what is read ahead, and when)
    and not about whether the prefetch threads get a core on a loaded machine."""
    import time

    from memfit.moe import experts

    real = experts.expert_mlp_grad

    def slow(*args):
        time.sleep(0.005)
        return real(*args)

    monkeypatch.setattr(experts, "expert_mlp_grad", slow)
    ref = tiny_moe("mixtral")
    ours = moe.load(save(ref, tmp_path / "ckpt"), expert_budget="50%")
    try:
        train_both(ref, ours, "mixtral", steps=3)
        backward = ours.memfit_moe.phase_summary()["backward"]
    finally:
        ours.memfit_moe.close()
    assert backward["misses"] <= 2 and backward["hits"] >= 0.9 * (backward["hits"] + backward["late"]
                                                                   + backward["misses"])


def test_a_bf16_model_trains_like_the_in_memory_bf16_model(tmp_path):
    """Mixtral's router returns fp32 weights beside bf16 experts: the backward computes in the experts' dtype."""
    ref = tiny_moe("mixtral").to(torch.bfloat16)
    ours = moe.load(save(ref, tmp_path / "ckpt"), expert_budget="25%", dtype=torch.bfloat16)
    try:
        errors = train_both(ref, ours, "mixtral", steps=2)
    finally:
        ours.memfit_moe.close()
    assert max(max(e) for e in errors) <= 2e-2, errors  # bf16 rounding; a dtype error would raise


def test_a_failed_backward_leaves_the_runtime_ready_for_inference(tmp_path, monkeypatch):
    """A read that fails in the middle of a backward: the error reaches the caller, and the cache's policy, the
    pass and the plan are the inference ones again, so the next forward runs (and counts) as a forward."""
    from memfit.errors import CheckpointError

    ref = tiny_moe("mixtral")
    model = moe.load(save(ref, tmp_path / "ckpt"), expert_budget="12.5%", policy="lru", predictor=None)
    rt = model.memfit_moe
    try:
        memfit.inject(model, lora("mixtral"))
        ids = batches(1)[0]
        loss = model(input_ids=ids, labels=ids).loss
        real = rt.store.fill

        def failing(key, out):
            if key[0] == min(rt.order):  # the first MoE layer: its backward runs last
                raise CheckpointError("disk gone")
            return real(key, out)

        monkeypatch.setattr(rt.store, "fill", failing)
        rt.cache.fill = failing
        with pytest.raises(CheckpointError, match="disk gone"):
            loss.backward()
        assert rt.phase == "forward" and rt.cache.policy is rt.policy and not rt._next_use and not rt._record
        rt.cache.fill = real
        before = rt.phase_summary()["backward"]["misses"]
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert torch.isfinite(got).all() and rt.phase_summary()["backward"]["misses"] == before
    finally:
        rt.close()


# -- the pipeline: memfit finetune --expert-budget ----------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = save(tiny_moe("qwen3_moe"), tmp_path_factory.mktemp("qwen3_moe"))
    return save_tokenizer(path)


def _losses(run) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if e.get("event") == "train"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "offload-cpu"])
def test_finetune_with_offloaded_experts_logs_the_in_memory_losses(tmp_path, moe_dir, optim):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    cfg = dict(max_steps=6, batch_size=4, lr=5e-3, log_every=1, optim=optim)
    adapter = memfit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    in_memory = finetune(moe_dir, data, tmp_path / "mem", adapter, TrainConfig(**cfg), quiet=True)
    summary = finetune(moe_dir, data, tmp_path / "off", adapter, TrainConfig(**cfg, expert_budget="25%"), quiet=True)
    mem, off = _losses(tmp_path / "mem"), _losses(tmp_path / "off")
    assert len(off) == 6 and max(abs(a - b) / abs(a) for a, b in zip(mem, off, strict=True)) <= TOL
    assert (summary["trainable_params"], summary["total_params"]) == (in_memory["trainable_params"],
                                                                      in_memory["total_params"])
    experts = summary["experts"]
    assert experts["bytes_read"] > 0 and experts["backward"]["hits"] + experts["backward"]["misses"] > 0


def test_resume_continues_an_offloaded_run_exactly(tmp_path, moe_dir):
    from test_train import crash_and_resume

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    cfg = TrainConfig(epochs=3, batch_size=4, lr=5e-3, log_every=1, checkpoint_every=2, expert_budget="25%")
    full, _ = crash_and_resume(moe_dir, data, tmp_path, memfit.LoraConfig(r=4), cfg, at=3)
    assert full["step"] == 6


def test_exported_adapter_gives_memfits_logits_in_peft(tmp_path, moe_dir):
    """The run's PEFT export over the in-memory HF model gives the logits of memfit's offloaded model."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    run = tmp_path / "run"
    adapter = memfit.LoraConfig(r=4, target_modules="all-linear")
    finetune(moe_dir, data, run, adapter, TrainConfig(max_steps=4, batch_size=4, lr=2e-2, expert_budget="25%"),
             quiet=True)
    result = subprocess.run([*memfit_cli(), "export", "--adapter", str(run), "--out", str(tmp_path / "peft")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ids = batches(1)[0]
    ours = load_finetuned(run)  # offloaded again: the run recorded its expert budget
    assert ours.memfit_moe is not None
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir), tmp_path / "peft").eval()
    base = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (ours, peft, base))
    ours.memfit_moe.close()
    assert rel(got, want) <= TOL and rel(before, want) > 1e-3  # the adapter trained, and PEFT applies it


def test_a_run_with_offloaded_experts_merges_with_every_weight_in_memory(tmp_path, moe_dir):
    from transformers import AutoModelForCausalLM

    from memfit.train.merge import merge_run

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    run = tmp_path / "run"
    finetune(moe_dir, data, run, memfit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
             TrainConfig(max_steps=3, batch_size=4, lr=2e-2, expert_budget="25%"), quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(merge_run(run, tmp_path / "merged")).eval()
    ours = load_finetuned(run)
    ids = batches(1)[0]
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, merged(input_ids=ids).logits
    ours.memfit_moe.close()
    assert rel(got, want) <= 1e-4  # merging rounds W + BA once


def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, moe_dir):
    first = run_cli(tmp_path, moe_dir, "--expert-budget", "25%")
    assert first.returncode == 0, first.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    result = run_cli(tmp_path, moe_dir, "--expert-budget", "25%", "--targets", "experts", "--overwrite")
    _one_line_error(result, "routed experts")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files


def memfit_cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "memfit.cli"]


# -- bad input ---------------------------------------------------------------------------------------------------

def run_cli(tmp_path, model, *extra: str) -> subprocess.CompletedProcess:
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    return subprocess.run([*memfit_cli(), "finetune", "--no-plan", "--model", str(model), "--data", str(data), "--out",
                           str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", *extra],
                          capture_output=True, text=True)


def _one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_budget_below_one_layers_top_k_states_the_minimum(tmp_path, moe_dir):
    result = run_cli(tmp_path, moe_dir, "--expert-budget", "1%")
    _one_line_error(result, "top-2 experts need at least", "Raise the budget")
    assert not (tmp_path / "out").exists()


def test_targets_naming_experts_are_refused(tmp_path, moe_dir):
    result = run_cli(tmp_path, moe_dir, "--expert-budget", "25%", "--targets", "experts")
    _one_line_error(result, "name the routed experts' weights", "target attention")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="routed experts"):
        finetune(moe_dir, tmp_path / "train.jsonl", tmp_path / "out2",
                 memfit.LoraConfig(target_modules=r".*mlp\.experts.*"), TrainConfig(expert_budget="25%"), quiet=True)


def test_missing_and_truncated_experts_are_clear_errors(tmp_path, moe_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(moe_dir, broken)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if ".experts.3." in k)
    save_file({k: v for k, v in weights.items() if k != key}, broken / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(run_cli(tmp_path, broken, "--expert-budget", "25%"), key)
    assert not (tmp_path / "out").exists()

    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    size = (broken / "model.safetensors").stat().st_size
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(size - 4096)
    _one_line_error(run_cli(tmp_path, broken, "--expert-budget", "25%"), "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_expert_budget_refuses_what_it_cannot_combine_with(tmp_path, moe_dir):
    _one_line_error(run_cli(tmp_path, moe_dir, "--expert-budget", "25%", "--weights-budget", "50%"),
                    "--expert-budget does not combine with --weights-budget")
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": str(i % 2)} for i, t in enumerate(TEXTS)])
    with pytest.raises(ConfigError, match="causal language models"):
        finetune(moe_dir, data, tmp_path / "cls", memfit.LoraConfig(), TrainConfig(expert_budget="25%"), quiet=True)
