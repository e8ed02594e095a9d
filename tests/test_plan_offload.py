"""The plan of runs that keep weights on disk (--weights-budget streaming, --expert-budget experts): its terms against
the engine's own, the fast subset of configurations against the measured peak RSS of real runs, `--memory` choosing
streaming, and generate's --metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_model_dir, write_jsonl
from test_cli_rough_edges import memfit_cli, one_error_line

from memfit.adapters import get_method
from memfit.plan import plan_finetune, plan_generate
from memfit.serve.loading import ServeConfig
from memfit.tiers.memory import storage_bytes
from memfit.train.config import TrainConfig

QV = {"r": 4, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A Llama of 8 layers of 3.1 MB (35 MB of weights, untied): streaming moves enough bytes to be seen in RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return save_model_dir(LlamaForCausalLM(config), tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    from test_moe_models import save, save_tokenizer, tiny_moe

    return save_tokenizer(save(tiny_moe("mixtral").train(), tmp_path_factory.mktemp("moe") / "m"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rows") / "d.jsonl",
                       [{"text": "the quick brown fox jumps over the lazy dog " * 20}] * 16)


def _real_step(model, batch: int = 2, length: int = 16) -> None:
    ids = torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def test_stream_terms_are_the_stream_s(wide_dir):
    """The resident weights are those the stream loads, and the read buffers are the mappings its reader keeps after
    a real update (two layers' reads, pooled)."""
    from memfit.adapters import inject
    from memfit.train.finetune import load_base
    from memfit.train.tasks import TASKS

    adapter = get_method("lora").config_cls(**QV)
    plan = plan_finetune(wide_dir, adapter, TrainConfig(batch_size=2, max_length=16, weights_budget="40%"),
                         device="cpu", runtime=0)
    model, handle, _ = load_base(wide_dir, TASKS["causal-lm"](None), weights_budget="40%")
    inject(model, adapter)
    assert handle.streamed and plan.get("weights resident") == handle.resident_bytes
    _real_step(model)
    assert plan.get("stream buffers") == sum(len(buf) for buf in handle.reader._pool) > 0
    in_memory = plan_finetune(wide_dir, adapter, TrainConfig(batch_size=2, max_length=16), device="cpu", runtime=0)
    assert plan.get("activations") < in_memory.get("activations")  # streamed layers are checkpointed
    handle.close(materialize=False)


def test_expert_terms_are_the_offloaded_model_s(moe_dir):
    import memfit.moe
    from memfit.adapters import inject

    adapter = get_method("lora").config_cls(**QV)
    plan = plan_finetune(moe_dir, adapter, TrainConfig(batch_size=2, max_length=16, expert_budget="50%"),
                         device="cpu", runtime=0)
    model = memfit.moe.load(moe_dir, expert_budget="50%")
    inject(model, adapter)
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    assert plan.get("weights resident") == storage_bytes(frozen)
    assert plan.get("expert cache") == model.memfit_moe.cache.nbytes > 0
    _real_step(model)  # the plan's activations run the same module: its forward and recomputing backward
    assert plan.get("activations") > 0 and plan.get("gradients") == plan.get("trainable weights")
    model.memfit_moe.close()


def test_generation_with_offloaded_weights_plans_their_terms(wide_dir, moe_dir):
    streamed = plan_generate(wide_dir, ServeConfig(serve_adapters=False, weights_budget="50%"), 20, 4,
                             device="cpu", runtime=0)
    whole = plan_generate(wide_dir, ServeConfig(serve_adapters=False), 20, 4, device="cpu", runtime=0)
    assert streamed.get("stream buffers") > 0
    assert streamed.get("weights resident") + streamed.get("stream buffers") < whole.get("weights resident")
    experts = plan_generate(moe_dir, ServeConfig(serve_adapters=False, expert_budget="25%"), 20, 4, device="cpu",
                            runtime=0)
    import memfit.moe

    model = memfit.moe.load(moe_dir, expert_budget="25%")  # what generation loads: the cache it would fill
    try:
        assert experts.get("expert cache") == model.memfit_moe.cache.nbytes > 0
    finally:
        model.memfit_moe.close()


def _end(path: Path) -> dict:
    return [json.loads(line) for line in path.read_text().splitlines()][-1]


# The fast subset: runs with weights on disk, each in a fresh process with --lean-allocator, whose planned peak
# (the run plans itself first) is within 15% of its measured peak RSS. The first takes the default targets, whose
# lookup imports PEFT's table (~57 MB on a model this small: the plan counts it in the runtime).
SUBSET = {
    "finetune, --weights-budget 30MB": ("wide", ["finetune", "--batch-size", 4, "--max-length", 128,
                                                 "--weights-budget", "30MB"]),
    "finetune MoE, --expert-budget 50%": ("moe", ["finetune", "--batch-size", 4, "--max-length", 64,
                                                  "--targets", "q_proj,v_proj", "--expert-budget", "50%"]),
    "generate, --weights-budget 50%": ("wide", ["generate", "--prompt", "the quick brown fox " * 8, "-n", 8,
                                                "--weights-budget", "50%"]),
    "generate MoE, --expert-budget 25%": ("moe", ["generate", "--prompt", "the quick brown fox " * 2, "-n", 8,
                                                  "--expert-budget", "25%"]),
}


@pytest.mark.parametrize("case", list(SUBSET))
def test_subset_plan_within_15_percent_of_the_run(case, wide_dir, moe_dir, rows, tmp_path):
    which, args = SUBSET[case]
    model = wide_dir if which == "wide" else moe_dir
    out, metrics = tmp_path / "run", tmp_path / "gen.jsonl"
    extra = (["--data", rows, "--out", out, "--max-steps", 2] if args[0] == "finetune" else ["--metrics", metrics])
    proc = memfit_cli(*args, "--model", model, *extra, "--lean-allocator", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = _end(out / "metrics.jsonl" if args[0] == "finetune" else metrics)
    planned, measured = end["memory_planned"], end["memory_measured"]
    assert "stream buffers" in planned or "expert cache" in planned
    assert planned["weights resident"] == measured["weights resident"]
    if "expert cache" in planned:
        assert planned["expert cache"] == measured["expert cache"]
    assert 0.85 <= planned["peak"] / measured["peak"] <= 1.15, (planned, measured)


def test_memory_streams_before_it_quantizes(wide_dir):
    """A budget below every in-memory plan: --memory streams the layers at the largest share that fits, with
    AdamW8bit and the largest micro-batch, before it would quantize the base."""
    from memfit.plan.search import MARGIN, STREAM_SHARES, fit_memory

    adapter = get_method("lora").config_cls(**QV)
    small = TrainConfig(batch_size=1, max_length=64, optim="adamw8bit", lean_allocator=True)
    in_memory = plan_finetune(wide_dir, adapter, small, device="cpu", runtime=0).peak_bytes
    streamed = {s: plan_finetune(wide_dir, adapter, TrainConfig(**{**small.to_dict(), "weights_budget": s}),
                                 device="cpu", runtime=0).peak_bytes for s in STREAM_SHARES[:2]}
    assert streamed["50%"] < streamed["75%"] < in_memory
    budget = int((streamed["50%"] + streamed["75%"]) / 2 / MARGIN)
    fit = fit_memory(wide_dir, adapter, TrainConfig(batch_size=2, max_length=64), budget, device="cpu", runtime=0)
    assert (fit.train.weights_budget, fit.train.quantize, fit.train.optim) == ("50%", None, "adamw8bit")
    assert "--weights-budget 50%" in fit.changes and fit.plan.peak_bytes <= MARGIN * budget


def test_nothing_fits_names_streaming_as_tried(wide_dir):
    from memfit.errors import ConfigError
    from memfit.plan.search import fit_memory

    adapter = get_method("lora").config_cls(**QV)
    with pytest.raises(ConfigError, match=r"nothing fits in 1.0 MB: the smallest plan needs .*\(--batch-size 1, "
                                          r"--optim adamw8bit, --(quantize nf4|weights-budget \d+%)\); its largest "
                                          r"part is"):
        fit_memory(wide_dir, adapter, TrainConfig(batch_size=2, max_length=64), "1MB", device="cpu", runtime=0)


def test_metrics_must_be_a_file(wide_dir, tmp_path):
    one_error_line(memfit_cli("generate", "--model", wide_dir, "--prompt", "hi", "--metrics", tmp_path),
                   "--metrics .* is a directory; give a file")
    under_a_file = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hi"}]) / "metrics.jsonl"
    one_error_line(memfit_cli("generate", "--model", wide_dir, "--prompt", "hi", "--metrics", under_a_file),
                   "--metrics .* cannot be written")


def test_plan_refuses_a_streamed_head(wide_dir):
    """A budget that streams the head too is refused in one line naming the fix."""
    one_error_line(memfit_cli("plan", "--model", wide_dir, "--weights-budget", "25%"),
                   "streams the output head too.*plan a larger budget")


def test_memory_with_weights_on_disk_is_not_offered_nf4(wide_dir, moe_dir):
    """A run already streamed or offloaded cannot also be quantized at load: --memory says nothing fits instead of
    failing on a quantized candidate it built itself."""
    from memfit.errors import ConfigError
    from memfit.plan.search import fit_memory, fit_serving

    adapter = get_method("lora").config_cls(**QV)
    with pytest.raises(ConfigError, match=r"nothing fits in 100.0 KB: the smallest plan needs"):
        fit_memory(moe_dir, adapter, TrainConfig(batch_size=2, max_length=16, expert_budget="50%"), "100KB",
                   device="cpu", runtime=0)
    for config in (ServeConfig(serve_adapters=False, weights_budget="50%", device="cpu"),
                   ServeConfig(serve_adapters=False, expert_budget="50%", device="cpu")):
        with pytest.raises(ConfigError, match=r"nothing fits in 100.0 KB: the smallest plan needs"):
            fit_serving(wide_dir if config.weights_budget else moe_dir, config, "100KB", (8, 4, 1), runtime=0)


def test_offloaded_experts_are_planned_on_the_cpu_where_a_gpu_is_present(moe_dir, monkeypatch):
    """The experts' cache is in host RAM and memfit.moe runs the model on the CPU: the plans and --memory searches
    are the CPU's (its runtime, --lean-allocator), whatever device a GPU host would default to."""
    from memfit.plan.search import fit_memory, fit_serving

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = ServeConfig(serve_adapters=False, expert_budget="25%")
    assert plan_generate(moe_dir, config, 20, 4, runtime=0).device == "cpu"
    serving = fit_serving(moe_dir, config, "8GB", (20, 4, 1))
    tuning = fit_memory(moe_dir, get_method("lora").config_cls(**QV),
                        TrainConfig(batch_size=2, max_length=16, expert_budget="25%"), "8GB")
    for fit in (serving, tuning):
        assert fit.plan.device == "cpu" and fit.plan.get("runtime") > 0 and "--lean-allocator" in fit.changes
