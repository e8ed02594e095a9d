"""What a new user hit, through the real CLI: each bad input is one `error:` line, exit status 2, the fix named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_ok, save_model_dir, write_jsonl

TEXT = [{"text": t} for t in ["apache traffic server software developers kit", "puppet module for monit",
                              "awesome party music player", "print plugin for the gimp"] * 8]


def memfit_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memfit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """The run failed with exit 2 and exactly one line on stderr, `error: ...` matching `pattern`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", TEXT)


def test_missing_model_directory_fails_at_once_without_a_hub(tmp_path, data):
    t0 = time.perf_counter()
    proc = memfit_cli("finetune", "--model", tmp_path / "no-such-dir", "--data", data, "--out", tmp_path / "o")
    "--no-plan", one_error_line(proc, r"model directory .*no-such-dir does not exist.*memfit never downloads")
    assert time.perf_counter() - t0 < 30  # no retries against a model hub


def test_directory_without_weights_says_so(tmp_path, data, llama_dir):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (empty / f.name).write_bytes(f.read_bytes())
    proc = memfit_cli("finetune", "--no-plan", "--model", empty, "--data", data, "--out", tmp_path / "o")
    one_error_line(proc, r"has config.json but no weights \(model.safetensors")


@pytest.mark.parametrize("setting, pattern", [
    ("r=abc", r"--set r: 'abc' is not an int or none"),
    ("dissociation=maybe", r"--set dissociation: 'maybe' is not a bool; write true or false"),
    ("r_eq=", r"--set r_eq: '' is not an int"),
    ("nonsense=1", r"--set nonsense: not an option of MoSConfig; its options are"),
])
def test_set_values_are_parsed_by_the_fields_type(tmp_path, data, llama_dir, setting, pattern):
    proc = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "o", "--method", "mos",
                      "--no-plan", "--set", setting)
    one_error_line(proc, pattern)


def test_set_parses_booleans_and_lists(tmp_path, data, llama_dir):
    out = tmp_path / "run"
    cli_ok("finetune", "--model", llama_dir, "--data", data, "--out", out, "--method", "mos", "--max-steps", "1", "-q",
       "--no-plan", "--set", "dissociation=no", "--set", "r_eq=2", "--set", "target_modules=q_proj,k_proj")
    config = json.loads((out / "adapter_config.json").read_text())["config"]
    assert config["dissociation"] is False and config["r_eq"] == 2 and config["target_modules"] == ["q_proj", "k_proj"]


def test_a_finished_run_is_never_overwritten_silently(tmp_path, data, llama_dir):
    out = tmp_path / "run"
    common = ["finetune", "--no-plan", "--model", llama_dir, "--data", data, "--out", out, "--max-steps", "2", "-q"]
    cli_ok(*common)
    before = (out / "adapter.safetensors").read_bytes()
    one_error_line(memfit_cli(*common), r"holds a finished run .*pass --overwrite to replace it")
    assert (out / "adapter.safetensors").read_bytes() == before
    cli_ok(*common, "--overwrite", "--seed", "1")
    assert (out / "adapter.safetensors").read_bytes() != before


def test_an_interrupted_run_points_to_resume(tmp_path, data, llama_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint").mkdir()
    proc = memfit_cli("finetune", "--no-plan", "--model", llama_dir, "--data", data, "--out", out)
    one_error_line(proc, r"holds an interrupted run \(checkpoint/\); continue it with --resume")


def test_quiet_still_says_where_the_outputs_went_and_resume_says_from_where(tmp_path, data, llama_dir):
    out = tmp_path / "run"
    common = ["finetune", "--no-plan", "--model", llama_dir, "--data", data, "--out", out, "--max-steps", "4",
              "--checkpoint-every", "2"]
    printed = cli_ok(*common, "-q")
    assert printed.strip() == f"wrote the run to {out}"
    resumed = cli_ok(*common, "--resume")  # the last checkpoint is at update 2 (the end of a run saves no checkpoint)
    assert "resuming from update 2 of 4" in resumed


def test_one_peak_memory_figure(tmp_path, data, llama_dir):
    printed = cli_ok("finetune", "--no-plan", "--model", llama_dir, "--data", data, "--out", tmp_path / "run",
                     "--max-steps", "2")
    table_peak = re.search(r"│ peak\s+│\s+([\d.]+ [KMG]?B)", printed).group(1)
    summary_peak = re.search(r"peak memory\s+│\s+([\d.]+ [KMG]?B) \(since training started\)", printed).group(1)
    assert table_peak == summary_peak
    end = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["peak_mem_bytes"] > 0


def test_mos_defaults_work_on_a_shallow_model_and_say_what_was_chosen(tmp_path, bert_dir, sections):
    train, _ = sections
    printed = cli_ok("finetune", "--model", bert_dir, "--data", train, "--out", tmp_path / "run", "--method", "mos",
                 "--no-plan", "--max-steps", "1")
    assert "MoS: active rank r=14, not the paper's 16: with 6 layer(s)" in " ".join(printed.split())
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["config"]
    assert config["r"] == 14
    proc = memfit_cli("finetune", "--model", bert_dir, "--data", train, "--out", tmp_path / "r2", "--method", "mos",
                      "--no-plan", "-r", "16")  # an explicit setting that cannot work stays an error
    one_error_line(proc, r"public pool holds 12 rank vectors.*lower r or raise r_eq")


def test_a_model_type_no_table_lists_trains_with_default_targets(tmp_path, data):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("phi3", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model_dir = save_model_dir(AutoModelForCausalLM.from_config(config), tmp_path / "phi3")
    cli_ok("finetune", "--no-plan", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
           "-q")
    targets = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]


def test_data_from_a_pipe(tmp_path, data, llama_dir):
    """`--eval-data <(head val.jsonl)`: a process substitution is a readable file, not a missing one."""
    out = tmp_path / "run"
    cmd = (f"{sys.executable} -m memfit.cli finetune --model {llama_dir} --data <(cat {data}) "
           f"--eval-data <(head -n 5 {data}) --out {out} --max-steps 1 -q")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "end" and "eval_loss" in e for e in evals)
