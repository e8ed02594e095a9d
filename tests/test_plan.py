"""The memory planner: its tracer against known allocations, its fake-tensor trace against the same update on real
tensors, and `memfit plan`'s output and errors."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import cli_ok, save_model_dir, write_jsonl
from test_cli_rough_edges import memfit_cli, one_error_line

from memfit import quant
from memfit.adapters import get_method, inject
from memfit.local import from_pretrained
from memfit.plan import LiveBytes, plan_finetune
from memfit.plan.predict import _trace_update
from memfit.tiers.memory import storage_bytes
from memfit.train.config import TrainConfig
from memfit.train.tasks import TASKS
from memfit.train.trainer import make_optimizer


def test_live_bytes_counts_creations_and_frees():
    held = torch.ones(1000)
    with LiveBytes([held]) as live:
        a = torch.empty(1000)  # 4000 B
        b = a * 2  # 8000 B live
        view = b[:10]  # a view shares b's storage: nothing new
        del a  # 4000 B live
        held.mul_(2)  # in place on a held tensor: not counted
        c = torch.empty(500, dtype=torch.float64)  # 4000 B: 8000 live again
        assert (live.current, live.peak) == (8000, 8000)
        assert live.mark() == 8000 and live.peak == 8000
        del b, c
        assert live.current == 4000  # the view keeps b's storage alive
        del view
    assert live.current == 0 and live.peak == 8000


CASES = {
    "lora all-linear, adamw": ("llama", "lora", {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
                               "adamw"),
    "mos, adamw": ("llama", "mos", {"r": 4, "r_eq": 2, "r_pri": 1, "shards": 2, "target_modules": ["q_proj", "v_proj"]},
                   "adamw"),
    "full, galore": ("llama", "full", {}, "galore"),
    "lora, chunked loss": ("llama", "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "adamw"),
    "lora, mezo": ("llama", "lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}, "mezo"),
    "bert classify, lora": ("bert", "lora", {"r": 4, "target_modules": ["query", "value"]}, "adamw"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fake_trace_equals_the_real_update(case, llama_dir, bert_dir, monkeypatch):
    """Every traced component equals the live bytes of the same update run on real tensors (same code path)."""
    if "chunked" in case:  # the loss of a large vocabulary: hidden states of the target positions, in chunks
        monkeypatch.setattr("memfit.train.loss.CHUNK_BYTES", 16384)
    which, method, options, optim = CASES[case]
    root = llama_dir if which == "llama" else bert_dir
    task = "causal-lm" if which == "llama" else "classify"
    labels = ["a", "b", "c"] if task == "classify" else None
    adapter = get_method(method).config_cls(**options)
    train = TrainConfig(batch_size=3, max_length=24, optim=optim, proj_rank=4 if optim == "galore" else None)
    plan = plan_finetune(root, adapter, train, task=task, labels=labels, device="cpu")

    real = _real_update(root, task, labels, method, options, train)
    for name, size in real.items():
        assert plan.get(name) == size, (name, plan.get(name), size)
    assert real["activations"] > 0
    # from the second update on, the optimizer's states are held through the forward and backward
    held = plan.get("runtime") + plan.get("weights resident") + plan.get("trainable weights") + real["optimizer states"]
    assert plan.peak_bytes == held + real["gradients"] + max(real["activations"], real.get("optimizer step", 0))


def _real_update(root, task, labels, method, options, train) -> dict[str, int]:
    """The traced components of one update of the real model, loaded and quantized as `memfit finetune` does."""
    task_obj = TASKS[task](labels)
    model = from_pretrained(getattr(__import__("transformers"), task_obj.auto_class), root, dtype=torch.float32,
                            **task_obj.model_kwargs())
    if task == "classify":
        model.config.pad_token_id = 0
        options = {**options, "modules_to_save": ["classifier"]}
    if train.quantize:
        quant.quantize(model, quant.QuantConfig(kind=train.quantize, skip=list(quant.HEADS)))
    inject(model, get_method(method).config_cls(**options))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(train, named, Path("unused"))
    components, _ = _trace_update(model, task_obj, train, optimizer, [p for _, p in named], torch.device("cpu"))
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return {c.name: c.bytes for c in components} | {"weights resident": storage_bytes(frozen)}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_plan_equals_the_real_update(kind, llama_dir, monkeypatch):
    """--quantize: the weights are the quantized bytes, and the update on them traces as on real tensors. Both
    sides take the torch-op dequantization (a fake tensor has no bytes for the C kernel; the kernel's equality
    with it is tests/test_quant.py's)."""
    monkeypatch.setattr(sys.modules["memfit.quant.linear"], "_kernel", lambda parts: None)
    options = {"r": 4, "target_modules": "all-linear"}
    train = TrainConfig(batch_size=3, max_length=24, quantize=kind)
    plan = plan_finetune(llama_dir, get_method("lora").config_cls(**options), train, device="cpu")
    real = _real_update(llama_dir, "causal-lm", None, "lora", options, train)
    for name, size in real.items():
        assert plan.get(name) == size, (name, plan.get(name), size)
    fp32 = plan_finetune(llama_dir, get_method("lora").config_cls(**options), replace(train, quantize=None))
    assert real["weights resident"] < 0.65 * fp32.get("weights resident")  # the tiny model's embeddings stay fp32


def test_a_quantized_checkpoint_plans_as_quantizing_at_load(tmp_path):
    """A checkpoint written by `memfit quantize` (its head tied to the fp32 embedding) plans exactly as --quantize."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llama_dir = save_model_dir(LlamaForCausalLM(config), tmp_path / "tied")
    cli_ok("quantize", "--model", llama_dir, "--out", tmp_path / "q", "--kind", "nf4")
    adapter = get_method("lora").config_cls(r=4, target_modules="all-linear")
    train = TrainConfig(batch_size=2, max_length=16)
    written = plan_finetune(tmp_path / "q", adapter, train, device="cpu", runtime=0)
    at_load = plan_finetune(llama_dir, adapter, replace(train, quantize="nf4"), device="cpu", runtime=0)
    assert written.to_dict()["components"] == at_load.to_dict()["components"]


def test_states_and_gradients_match_the_optimizer(llama_dir):
    """AdamW: gradients = the trainable bytes, states = two moments per parameter plus a step count each."""
    adapter = get_method("lora").config_cls(r=4, target_modules=["q_proj", "v_proj"])
    plan = plan_finetune(llama_dir, adapter, TrainConfig(batch_size=2, max_length=16), device="cpu")
    trainable = plan.get("trainable weights")
    tensors = 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    assert plan.get("gradients") == trainable
    assert plan.get("optimizer states") == 2 * trainable + 4 * tensors


def test_activations_grow_with_the_batch(llama_dir):
    adapter = get_method("lora").config_cls(r=4, target_modules=["q_proj", "v_proj"])
    small, big = (plan_finetune(llama_dir, adapter, TrainConfig(batch_size=b, max_length=16), device="cpu")
                  for b in (2, 8))
    assert 3.5 < big.get("activations") / small.get("activations") < 4.5  # per example, plus B x T x T masks


def test_plan_cli_json_and_table(llama_dir, bert_dir, sections):
    out = json.loads(cli_ok("plan", "--model", llama_dir, "--batch-size", 2, "--max-length", 16, "--json"))
    c = out["components"]
    held = c["runtime"] + c["weights resident"] + c["trainable weights"] + c["optimizer states"]
    assert out["peak_bytes"] == held + c["gradients"] + max(c["activations"], c.get("optimizer step", 0))
    assert c["runtime"] > 50e6  # this process's resident set: torch alone is more
    text = cli_ok("plan", "--model", bert_dir, "--data", sections[0], "--batch-size", 2)
    assert "activations" in text and "peak" in text


@pytest.mark.parametrize("flags, message", [
    (["--weights-budget", "1KB"], "weights budget 1.0 KB is too small.*Raise the budget to at least"),
    (["--expert-budget", "50%"], "cannot offload model_type .llama."),
    (["--optim", "nope"], "unknown optimizer"),
    (["--targets", "nothing_here"], "nothing_here"),
])
def test_plan_bad_input_is_one_line(flags, message, llama_dir):
    one_error_line(memfit_cli("plan", "--model", llama_dir, *flags), message)


def test_plan_missing_model(tmp_path):
    one_error_line(memfit_cli("plan", "--model", tmp_path / "nothing"), "does not exist|config.json")


LEAN_PROBE = """
import ctypes, sys, torch
from memfit.tiers.memory import lean_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
assert sys.argv[1] == "default" or lean_allocator()
warm = torch.ones(1024 * 1024)
del warm  # glibc's default raises its mmap threshold to the size of a freed mapped block
kept = [torch.ones(256 * 1024) for _ in range(200)]  # 200 MB in 1 MB blocks
print(libc.mallinfo2().hblkhd)
"""


@pytest.mark.parametrize("mode", ["lean", "default"])
def test_lean_allocator_maps_large_blocks(mode):
    """After lean_allocator, 1 MB tensors are mapped blocks (unmapped when freed, never heap holes); glibc's
    default, once a 4 MB block was freed, puts them in its heap (the reference: the probe tells the two apart)."""
    proc = subprocess.run([sys.executable, "-c", LEAN_PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mapped = int(proc.stdout)
    assert mapped > 190 * 2**20 if mode == "lean" else mapped < 50 * 2**20, mapped


def _end_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end"  # the last line, as scripts read it
    return events[-1]


def test_finetune_prints_and_logs_planned_against_measured(llama_dir, tmp_path):
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 8)
    out = tmp_path / "run"
    text = cli_ok("finetune", "--model", llama_dir, "--data", rows, "--out", out, "--max-steps", 2,
                  "--batch-size", 4, "--max-length", 24)
    assert "planned and measured" in text
    end = _end_event(out)
    planned, measured = end["memory_planned"], end["memory_measured"]
    for name in ("weights resident", "trainable weights", "gradients"):
        assert planned[name] == measured[name], name
    # the measured states leave out the per-tensor step counts (4 bytes each) that the plan counts
    assert planned["optimizer states"] == pytest.approx(measured["optimizer states"], rel=0.01)
    assert planned["peak"] > 0 and measured["peak"] > 0


def test_no_plan_starts_at_once_and_cannot_go_with_memory(llama_dir, tmp_path):
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 8)
    out = tmp_path / "run"
    text = cli_ok("finetune", "--no-plan", "--model", llama_dir, "--data", rows, "--out", out, "--max-steps", 1,
                  "--batch-size", 4, "--max-length", 24)
    assert "planned" not in text and "memory_planned" not in _end_event(out)
    proc = memfit_cli("finetune", "--no-plan", "--memory", "1GB", "--model", llama_dir, "--data", rows, "--out",
                      tmp_path / "other")
    one_error_line(proc, "--memory plans the run, which --no-plan forbids: drop one of them")


def test_a_streamed_finetune_prints_and_logs_its_plan(llama_dir, tmp_path):
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 8)
    out = tmp_path / "run"
    text = cli_ok("finetune", "--model", llama_dir, "--data", rows, "--out", out, "--max-steps", 1,
                  "--batch-size", 4, "--max-length", 24, "--weights-budget", "60%")
    assert "planned and measured" in text
    end = _end_event(out)
    assert end["memory_planned"]["stream buffers"] > 0
    assert end["memory_planned"]["weights resident"] == end["memory_measured"]["weights resident"]


def test_memory_chooses_the_largest_micro_batch_that_fits(llama_dir):
    from memfit.plan.search import MARGIN, fit_memory

    adapter = get_method("lora").config_cls(r=4, target_modules="all-linear")
    runtime = 400 * 2**20
    peaks = {b: plan_finetune(llama_dir, adapter, TrainConfig(batch_size=b, max_length=64, optim="adamw",
                                                                lean_allocator=True),
                              device="cpu", runtime=runtime).peak_bytes for b in (2, 4)}
    budget = int((peaks[2] + peaks[4]) / 2 / MARGIN)
    fit = fit_memory(llama_dir, adapter, TrainConfig(batch_size=8, max_length=64), budget, device="cpu",
                     runtime=runtime)
    assert (fit.train.batch_size, fit.train.grad_accum, fit.train.optim) == (2, 4, "adamw")
    assert fit.train.lean_allocator and fit.plan.peak_bytes <= MARGIN * budget
    assert fit.changes == ["--batch-size 2", "--grad-accum 4", "--lean-allocator"]
    whole = fit_memory(llama_dir, adapter, TrainConfig(batch_size=8, max_length=64), 10 * budget, device="cpu",
                       runtime=runtime)
    assert (whole.train.batch_size, whole.train.grad_accum) == (8, 1)


def test_memory_quantizes_the_base_last(llama_dir, monkeypatch):
    """The search's order: as requested, AdamW8bit, the layers streamed at shrinking shares, an NF4 base (QLoRA)
    last. Real plans of this tiny model first (its untied embedding streams too, so streaming at some share
    plans below NF4 and is chosen for a budget between the two); then the same search over stand-in plans whose
    NF4 base is the only one under the budget, where it must end at NF4 with the largest micro-batch that fits."""
    from memfit.errors import ConfigError
    from memfit.plan import search
    from memfit.plan.predict import Component, Plan

    adapter = get_method("lora").config_cls(r=4, target_modules="all-linear")
    order = search._candidates(TrainConfig(batch_size=2, max_length=64), adapter)
    assert [(c.optim, c.weights_budget, c.quantize) for c in order] == [
        ("adamw", None, None), *[("adamw8bit", s, None) for s in (None, *search.STREAM_SHARES)],
        ("adamw8bit", None, "nf4")]
    small = TrainConfig(batch_size=1, max_length=64, optim="adamw8bit", lean_allocator=True)
    streamed = []
    for share in search.STREAM_SHARES:
        with contextlib.suppress(ConfigError):  # a share too small to stream the tiny model
            streamed.append(plan_finetune(llama_dir, adapter, replace(small, weights_budget=share), device="cpu",
                                          runtime=0).peak_bytes)
    in_memory = plan_finetune(llama_dir, adapter, small, device="cpu", runtime=0).peak_bytes
    nf4 = plan_finetune(llama_dir, adapter, replace(small, quantize="nf4"), device="cpu", runtime=0).peak_bytes
    assert min(streamed) < nf4 < in_memory
    budget = int((min(streamed) + nf4) / 2 / search.MARGIN)
    fit = search.fit_memory(llama_dir, adapter, TrainConfig(batch_size=2, max_length=64), budget, device="cpu",
                            runtime=0)
    assert fit.train.weights_budget is not None and fit.train.quantize is None

    def stand_in(model_dir, adapter, train, **kw):  # NF4 500 + 100 per row; everything else 2000 + 100 per row
        peak = (500 if train.quantize == "nf4" else 2000) + 100 * train.batch_size
        return Plan([Component("weights resident", peak - 100 * train.batch_size),
                     Component("activations", 100 * train.batch_size)], peak, "cpu")

    monkeypatch.setattr(search, "plan_finetune", stand_in)
    fit = search.fit_memory(llama_dir, adapter, TrainConfig(batch_size=4, max_length=64), int(750 / search.MARGIN),
                            device="cpu", runtime=0)
    assert (fit.train.quantize, fit.train.weights_budget, fit.train.batch_size, fit.train.grad_accum) == \
        ("nf4", None, 2, 2)


def test_memory_nothing_fits_names_the_smallest_budget(llama_dir):
    from memfit.errors import ConfigError
    from memfit.plan.search import fit_memory

    adapter = get_method("lora").config_cls(r=4, target_modules="all-linear")
    with pytest.raises(ConfigError, match=r"nothing fits in .*the smallest plan needs .*--batch-size 1, --optim "
                                          r"adamw8bit, --(quantize nf4|weights-budget \d+%)\).*largest part is"):
        fit_memory(llama_dir, adapter, TrainConfig(batch_size=8, max_length=64), "1MB", device="cpu")


def test_memory_flag_end_to_end(llama_dir, tmp_path):
    """`memfit plan --memory` prints the command; `memfit finetune --memory` (a fresh process) runs the chosen
    settings, under the budget."""
    text = cli_ok("plan", "--model", llama_dir, "--batch-size", 8, "--max-length", 24, "--memory", "3GB")
    assert "fits in 3GB" in text and "memfit finetune --model" in text and "--lean-allocator" in text
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 16)
    out = tmp_path / "run"
    proc = memfit_cli("finetune", "--model", llama_dir, "--data", rows, "--out", out, "--max-steps", 2,
                      "--batch-size", 8, "--max-length", 24, "--memory", "3GB", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--memory 3GB:" in proc.stdout
    assert _end_event(out)["memory_measured"]["peak"] <= 3e9
    one_error_line(memfit_cli("finetune", "--model", llama_dir, "--data", rows, "--out", tmp_path / "r2",
                              "--memory", "10MB"), "nothing fits in 10.0 MB")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_moe_plan_equals_the_real_update(arch, tmp_path):
    """A LoRA update of a tiny MoE of each family: transformers' experts sort the tokens by expert and run one
    grouped matmul, so every size is the routing's T x k rows and the plan is the real update's, byte for byte."""
    from test_moe_models import save, save_tokenizer, tiny_moe

    root = save_tokenizer(save(tiny_moe(arch).train(), tmp_path / "moe"))
    options = {"r": 4, "target_modules": ["o_proj"]}
    train = TrainConfig(batch_size=4, max_length=32)
    plan = plan_finetune(root, get_method("lora").config_cls(**options), train, device="cpu", runtime=0)
    real = _real_update(root, "causal-lm", None, "lora", options, train)
    for name, size in real.items():
        assert plan.get(name) == size, name


def test_the_peak_counts_the_states_through_later_updates(llama_dir):
    """Two real full-AdamW updates under LiveBytes: the second runs its forward and backward beside the states the
    first step made, and its peak is the plan's peak above the held weights (the first update's would be less)."""
    from memfit.train.tasks import TASKS

    train = TrainConfig(batch_size=3, max_length=24)
    plan = plan_finetune(llama_dir, get_method("full").config_cls(), train, device="cpu", runtime=0)
    task = TASKS["causal-lm"](None)
    model = from_pretrained(__import__("transformers").AutoModelForCausalLM, llama_dir, dtype=torch.float32)
    inject(model, get_method("full").config_cls())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(train, named, Path("unused"))
    from memfit.plan.predict import _batch

    batch = _batch(task, 3, 24, torch.device("cpu"))
    peaks = []
    with LiveBytes([*model.parameters(), *model.buffers()]) as live:
        for _ in range(2):
            live.mark()
            task.loss_sum(model, batch).backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peaks.append(live.peak)
    held = plan.get("runtime") + plan.get("weights resident") + plan.get("trainable weights")
    assert peaks[1] == plan.peak_bytes - held > peaks[0]
