"""The `memfit` commands on tiny checkpoints: finetune, export (loaded by PEFT), errors, torchrun + FSDP2, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli_ok, write_jsonl

from memfit.errors import ConfigError, TargetNotFoundError
from memfit.train.finetune import load_finetuned

TEXT = [{"text": t} for t in ["apache traffic server software developers kit", "puppet module for monit",
                              "awesome party music player", "print plugin for the gimp"] * 8]


def _events(out, kind="train"):
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


@pytest.mark.parametrize("method, extra", [("lora", ["-r", "4"]),
                                           ("mos", ["-r", "4", "--set", "r_eq=2", "--set", "r_pri=1"])])
def test_finetune_then_export_loads_in_peft_with_the_same_logits(tmp_path, bert_dir, sections, method, extra):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    train, val = sections
    out = tmp_path / "run"
    cli_ok("finetune", "--model", bert_dir, "--data", train, "--eval-data", val, "--out", out, "--method", method,
         "--no-plan", "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "--targets", "query,value", "-q", *extra)
    assert (out / "adapter.safetensors").is_file() and (out / "loss.png").is_file()
    cli_ok("export", "--adapter", out, "--to", "peft", "--out", tmp_path / "peft")

    ours = load_finetuned(out)
    labels = json.loads((out / "adapter_config.json").read_text())["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=len(labels)).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = torch.randint(5, 500, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(input_ids=x).logits, peft_model(input_ids=x).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_flags_are_clear_errors(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    common = ["finetune", "--no-plan", "--model", llama_dir, "--data", data, "--out", tmp_path / "o", "-q"]
    with pytest.raises(ConfigError, match="unknown adapter method 'lorax'; choose one of"):
        cli_ok(*common, "--method", "lorax")
    with pytest.raises(ConfigError, match=r"--set rq: not an option of MoSConfig"):
        cli_ok(*common, "--method", "mos", "--set", "rq=2")
    with pytest.raises(TargetNotFoundError, match="matched no Linear"):
        cli_ok(*common, "--targets", "qq_proj")
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        cli_ok(*common, "--optim", "sgd")


def test_errors_print_one_line_and_exit_2(tmp_path, llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", "finetune", "--model", str(llama_dir), "--data",
                           str(bad), "--no-plan", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "bad.jsonl:2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "memfit.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("shard", ["grad", "full"])
def test_torchrun_fsdp2_matches_one_process_and_resumes(tmp_path, llama_dir, shard):
    """2 ranks × batch 8 = one process × batch 16: same losses; --resume from the sharded checkpoint redoes the
    last updates identically."""
    data = write_jsonl(tmp_path / "d.jsonl", TEXT)
    common = ["finetune", "--model", llama_dir, "--data", data, "--method", "lora", "-r", "4", "--dropout", "0",
              "--no-plan", "--max-steps", "4", "--checkpoint-every", "2", "--log-every", "1", "--lr", "1e-2", "-q"]
    cli_ok(*common, "--out", tmp_path / "one", "--batch-size", "16")
    _torchrun([*common, "--out", tmp_path / "two", "--batch-size", "8", "--shard", shard])
    one, two = [e["loss"] for e in _events(tmp_path / "one")], [e["loss"] for e in _events(tmp_path / "two")]
    assert two == pytest.approx(one, rel=1e-5)
    adapter_one = load_finetuned(tmp_path / "one").state_dict()
    adapter_two = load_finetuned(tmp_path / "two").state_dict()
    for key in ("model.layers.0.self_attn.q_proj.lora_B", "model.layers.3.self_attn.v_proj.lora_A"):
        assert torch.allclose(adapter_one[key], adapter_two[key], rtol=1e-4, atol=1e-6), key

    _torchrun([*common, "--out", tmp_path / "two", "--batch-size", "8", "--shard", shard, "--resume"])
    again = [e["loss"] for e in _events(tmp_path / "two")]
    assert again == pytest.approx(two, rel=1e-6) and len(again) == 4


def test_demo_runs_on_a_small_encoder(tmp_path, bert_dir, sections):
    train, val = sections
    (tmp_path / "data").mkdir()
    for src, name in ((train, "debian-sections-train.jsonl"), (val, "debian-sections-val.jsonl")):
        (tmp_path / "data" / name).write_text(src.read_text())
    output = cli_ok("demo", "--model", bert_dir, "--data", tmp_path / "data", "--out", tmp_path / "demo",
                    "--max-steps", "3")
    assert "validation accuracy" in output and "LoRA r=8 on the same modules" in output
    assert (tmp_path / "demo" / "adapter.safetensors").is_file()


@pytest.mark.parametrize(("args", "code", "out"), [(["version"], 0, "memfit "),
                                                   (["export", "--adapter", "missing", "--out", "x"], 2, "error:")])
def test_a_torchrun_worker_keeps_its_exit_code_and_output(tmp_path, args, code, out):
    """Under torchrun the CLI leaves through os._exit (gloo can abort in interpreter finalization): the command's
    exit code and everything it printed must survive that."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert out in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
