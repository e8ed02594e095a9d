"""The memory plan of generation and serving: the fake-tensor trace against the engine on real tensors, the KV
cache against its size from the config, and `memfit plan --for`, `memfit generate`'s report and their errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli_ok, save_model_dir
from test_cli_rough_edges import memfit_cli, one_error_line

import memfit
from memfit.plan.generate import _trace, plan_generate, plan_serve
from memfit.serve.engine import Request, SamplingParams
from memfit.serve.loading import ServeConfig, build_engine, engine_memory


def _kv_bytes(config, rows: int, tokens: int) -> int:
    """K and V of every layer, fp32: [rows, kv heads, tokens, head dim] each."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * rows * config.num_key_value_heads * tokens * head_dim * 4


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_generation_plan_equals_the_engine_on_real_tensors(quantize, llama_dir, monkeypatch):
    """The plan's KV cache is the config's size at the last token and the largest cache a real run holds; its
    activations are the same traces on the real model."""
    if quantize:  # both sides take the torch-op dequantization (a fake tensor has no bytes for the C kernel)
        import sys

        monkeypatch.setattr(sys.modules["memfit.quant.linear"], "_kernel", lambda parts: None)
    config = ServeConfig(serve_adapters=False, max_seqs=3, kv_budget=4096, quantize=quantize)
    plan = plan_generate(llama_dir, config, 20, 6, prompts=5, device="cpu", runtime=0)
    engine, _, _ = build_engine(llama_dir, config)
    engine.eos_ids = set()
    model_config = engine.model.config
    assert plan.get("KV cache") == _kv_bytes(model_config, 3, 20 + 6 - 1)  # 3 rows: --max-seqs
    assert plan.get("weights resident") == engine_memory(engine)["weights resident"]

    seen = []
    requests = [engine.submit(Request(list(range(1, 21)), SamplingParams(max_new_tokens=6),
                                      on_token=lambda t: seen.append(engine.kv_bytes()))) for _ in range(3)]
    engine.run_until_done()
    assert all(len(r.generated) == 6 for r in requests) and max(seen) == plan.get("KV cache")

    held = [*engine.model.parameters(), *engine.model.buffers()]
    _, prefill = _trace(engine, held, None, 3, 20, 1)
    kv_end, decode = _trace(engine, held, None, 3, 24, 2)
    assert kv_end == plan.get("KV cache")
    # The fake trace takes the padded rows' path (a fake mask is never "all ones"), so it may hold the batch's
    # [rows, 1, prompt, prompt] bool attention mask that equal real prompts skip: exactly that, or nothing, more.
    assert plan.get("activations") - (max(prefill, decode) - kv_end) in (0, 3 * 20 * 20)
    assert plan.get("activations") > 0
    assert plan.peak_bytes == sum(c.bytes for c in plan.components)


def test_adapter_slots_and_host_copies_are_the_engine_s(llama_dir, tmp_path, write_rows):
    run = tmp_path / "run"
    cli_ok("finetune", "--model", llama_dir, "--data", write_rows, "--out", run, "--max-steps", 1,
           "--batch-size", 2, "--max-length", 16, "--targets", "q_proj,v_proj", "--set", "r=4")
    config = ServeConfig(adapters={"a": str(run)}, max_loras=2, max_lora_rank=8)
    plan = plan_generate(llama_dir, config, 10, 4, device="cpu", runtime=0)
    engine, _, _ = build_engine(llama_dir, config)
    real = engine_memory(engine)
    assert real["adapter slots"] > 0 and real["adapters in host memory"] > 0
    for name in ("weights resident", "adapter slots", "adapters in host memory"):
        assert plan.get(name) == real[name], name


def test_serve_plan_covers_its_budget(llama_dir):
    """A server at its limits: --kv-budget tokens of cache, as one long request or --max-seqs rows."""
    config = ServeConfig(max_seqs=4, kv_budget=64)
    plan = plan_serve(llama_dir, config, device="cpu", runtime=0)
    model_config = memfit.local.load_config(llama_dir)
    assert plan.get("KV cache") in (_kv_bytes(model_config, 1, 63), _kv_bytes(model_config, 4, 15))
    assert plan.get("adapter slots") > 0  # a server gives every Linear a slot when no adapter is named at start
    bigger = plan_serve(llama_dir, ServeConfig(max_seqs=4, kv_budget=256), device="cpu", runtime=0)
    assert bigger.get("KV cache") > 3 * plan.get("KV cache")


def test_generate_prints_planned_against_measured(llama_dir):
    text = cli_ok("generate", "--model", llama_dir, "--prompt", "gimp vim", "-n", 4)
    assert "planned and measured" in text and "KV cache" in text
    quiet = cli_ok("generate", "--model", llama_dir, "--prompt", "gimp vim", "-n", 4, "--no-plan")
    assert "planned and measured" not in quiet


def test_plan_for_generate_and_serve_cli(llama_dir):
    out = json.loads(cli_ok("plan", "--for", "generate", "--model", llama_dir, "--prompt-tokens", 12,
                            "--max-new-tokens", 5, "--prompts", 2, "--json"))
    assert out["components"]["KV cache"] == _kv_bytes(memfit.local.load_config(llama_dir), 2, 16)
    assert out["peak_bytes"] == sum(out["components"].values())
    text = cli_ok("plan", "--for", "serve", "--model", llama_dir, "--kv-budget", 128, "--max-seqs", 4)
    assert "KV cache" in text and "adapter slots" in text


@pytest.mark.parametrize("flags, message", [
    (["--for", "train"], "choose one of finetune, generate, serve"),
    (["--for", "generate", "--weights-budget", "1KB"], "weights budget 1.0 KB is too small"),
    (["--for", "generate", "--weights-budget", "50%", "--quantize", "nf4"], "--quantize with --weights-budget"),
    (["--for", "generate", "--prompt-tokens", 5000, "--kv-budget", 4096], "above --kv-budget"),
    (["--for", "serve", "--memory", "1MB"], "nothing fits in 1.0 MB: the smallest plan needs"),
])
def test_plan_for_bad_input_is_one_line(flags, message, llama_dir):
    one_error_line(memfit_cli("plan", "--model", llama_dir, *flags), message)


@pytest.fixture
def write_rows(tmp_path):
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 2}] * 4)


def test_the_tied_head_plans_once(tmp_path):
    """A tied head shares the embedding's storage: the plan counts it once, as the loaded engine holds it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    root = save_model_dir(LlamaForCausalLM(config), tmp_path / "tied")
    serve = ServeConfig(serve_adapters=False)
    plan = plan_generate(root, serve, 8, 2, device="cpu", runtime=0)
    engine, _, _ = build_engine(root, serve)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert plan.get("weights resident") == engine_memory(engine)["weights resident"]


def test_serving_memory_halves_the_kv_budget_before_it_quantizes(llama_dir):
    """--memory for a server: the largest --kv-budget (halved from the request) whose plan fits, then an NF4 base."""
    from memfit.plan.search import MARGIN, fit_serving

    config = ServeConfig(max_seqs=16, kv_budget=2048)  # 16 rows of the tiny Llama's context (128) fill it
    plans = {(kv, q): plan_serve(llama_dir, ServeConfig(max_seqs=16, kv_budget=kv, quantize=q, lean_allocator=True),
                                 device="cpu", runtime=0).peak_bytes for kv in (2048, 1024, 512) for q in (None, "nf4")}
    assert plans[2048, None] > plans[1024, None] > plans[512, None] > plans[512, "nf4"]
    fit = fit_serving(llama_dir, config, int((plans[2048, None] + plans[1024, None]) / 2 / MARGIN), runtime=0)
    assert (fit.config.kv_budget, fit.config.quantize) == (1024, None)
    assert fit.changes == ["--kv-budget 1024", "--lean-allocator"]
    budget = int((plans[512, None] + plans[512, "nf4"]) / 2 / MARGIN)
    small = fit_serving(llama_dir, config, budget, runtime=0)
    assert small.config.quantize == "nf4" and small.plan.peak_bytes <= MARGIN * budget


def test_generate_logs_planned_and_measured_to_metrics(llama_dir, tmp_path):
    path = tmp_path / "logs" / "generate.jsonl"
    for _ in range(2):  # appended, one line per run
        cli_ok("generate", "--model", llama_dir, "--prompt", "gimp vim", "-n", 3, "--metrics", path)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 2 and events[-1]["event"] == "end" and events[-1]["tokens"] == 3
    planned, measured = events[-1]["memory_planned"], events[-1]["memory_measured"]
    assert planned["weights resident"] == measured["weights resident"] and planned["KV cache"] == measured["KV cache"]
    assert measured["peak"] == events[-1]["peak_mem_bytes"] > 0 and planned["peak"] > 0


def test_generate_memory_end_to_end(llama_dir):
    text = cli_ok("generate", "--model", llama_dir, "--prompt", "gimp vim", "-n", 3, "--memory", "8GB")
    assert "--memory 8GB: --lean-allocator" in text and "planned and measured" in text
