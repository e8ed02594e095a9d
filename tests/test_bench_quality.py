"""bench/quality.py's own code on tiny models: training a configuration, the sweep, the table and the plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(sections, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    for src, name in zip(sections, ("debian-sections-train.jsonl", "debian-sections-val.jsonl"), strict=True):
        (data / name).write_text(src.read_text())
    return data


@pytest.fixture(scope="module")
def task(quality, bert_dir, data_dir):
    return quality.Task.load(bert_dir, data_dir)


def test_setups_train_only_what_they_say(quality, task):
    by_name = {s.name: s for s in quality.setups(task)}
    n_classes = len(task.labels)
    head = 32 * n_classes + n_classes
    lora = quality.run(by_name["LoRA r=1"], 1e-2, 0, task, epochs=1)
    assert lora["adapter_params"] == 1 * (32 + 32) * 2 * 6 and lora["head_params"] == head  # q and v, 6 layers
    frozen = quality.run(by_name["frozen encoder + head"], 1e-2, 0, task, epochs=1)
    assert frozen["adapter_params"] == 0 and 0.0 <= frozen["accuracy"] <= 1.0
    mos = quality.run(by_name["MoS, LoRA r=2 budget"], 1e-2, 0, task, epochs=1)
    assert mos["adapter_params"] == 2 * (32 + 32) * 2 * 6  # MoS trains exactly a rank-r_eq LoRA's parameters


def test_sweep_picks_the_best_dev_accuracy_at_the_final_runs_length(quality, task, monkeypatch):
    setup = quality.setups(task)[2]
    seen = {}

    def fake_run(setup, lr, seed, data, epochs, train=None, val=None, steps=None, head_lr=None):
        seen[lr] = (len(train), len(val), steps, head_lr)
        return {"accuracy": dict(zip(setup.lrs, (0.2, 0.7, 0.4), strict=True))[lr]}

    monkeypatch.setattr(quality, "run", fake_run)
    lr, scores = quality.sweep(setup, task, epochs=1, steps=17, head_lr=0.3)
    assert lr == setup.lrs[1] and scores == dict(zip(setup.lrs, (0.2, 0.7, 0.4), strict=True))
    n = len(task.train)
    dev = min(1000, n)
    assert all(v == (n - dev, dev, 17, 0.3) for v in seen.values())  # dev rows come from the training file
    seen.clear()
    quality.sweep(quality.setups(task)[0], task, epochs=1, steps=17, head_lr=None)
    assert seen and all(v[3] == lr for lr, v in seen.items())  # the reference row sweeps the head's own rate


def test_the_head_learns_at_its_own_rate(quality, task, monkeypatch):
    from memfit.train.trainer import Trainer

    assert quality._trainer("classifier", None) is Trainer
    lora = {s.name: s for s in quality.setups(task)}["LoRA r=1"]
    seen = {}
    cls = quality._trainer("classifier", 0.5)

    class Spy(cls):
        def _build_optimizer(self):
            opt = super()._build_optimizer()
            names = {id(p): n for n, p in self.params.items()}
            seen.update({names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]})
            return opt

    monkeypatch.setattr(quality, "_trainer", lambda head, head_lr: Spy)
    quality.run(lora, 1e-2, 0, task, epochs=1, steps=2, head_lr=0.5)
    head = {n: lr for n, lr in seen.items() if n.startswith("classifier.")}
    assert head and set(head.values()) == {0.5}
    assert len(seen) > len(head) and {lr for n, lr in seen.items() if n not in head} == {1e-2}


def test_summary_table_and_plot(quality, tmp_path):
    runs = [{"accuracy": a, "macro_f1": a - 0.1, "adapter_params": 768, "head_params": 100, "epoch_s": 2.0,
             "peak_mem_bytes": 2**20, "lr": 1e-3, "seed": s} for s, a in enumerate((0.5, 0.7))]
    metrics = ("accuracy", "macro_f1")
    rows = quality.summarize({"LoRA r=1": {"lr": 1e-3, "runs": runs}, "DiffFit": {"lr": 1e-2, "runs": runs}}, metrics)
    assert rows[0]["accuracy"] == pytest.approx((0.6, 0.1414213), rel=1e-5)
    table = quality.markdown(rows, metrics)
    assert "| LoRA r=1 | 768 | 100 | 0.001 | 0.600 ± 0.141 | 0.500 ± 0.141 | 2 | 1 MiB |" in table
    quality.plot(rows, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0
    json.dumps(rows)  # the JSON report must serialise


def test_causal_lm_task_scores_the_base_model_and_adapters_by_validation_loss(quality, llama_dir, data_dir):
    lm = quality.Task.load(llama_dir, data_dir, "lm")
    by_name = {s.name: s for s in quality.setups(lm)}
    base = quality.run(by_name["base model, no training"], 0.0, 0, lm, epochs=1)
    assert base["adapter_params"] == 0 and base["perplexity"] == pytest.approx(math.exp(base["loss"]), rel=1e-5)
    lora = quality.run(by_name["LoRA r=1"], 1e-2, 0, lm, epochs=1)
    assert lora["adapter_params"] == (32 + 32 + 32 + 16) * 4 and lora["head_params"] == 0  # q, v (2 kv heads)
    assert lora["loss"] < base["loss"]  # adapting to the synopses lowers their validation loss
    assert lm.best({1e-3: 2.5, 3e-3: 2.1}) == 3e-3  # lower loss wins


def test_sweep_grows_the_grid_while_the_best_is_at_its_edge(quality, task, monkeypatch):
    setup = quality.setups(task)[2]  # grid 3e-3, 1e-2, 3e-2
    monkeypatch.setattr(quality, "run", lambda setup, lr, *a, **k: {"accuracy": -abs(math.log(lr / 0.1))})
    lr, scores = quality.sweep(setup, task, epochs=1, steps=5, head_lr=None)
    assert len(scores) == 5 and lr == pytest.approx(0.09)  # grew twice (x3): 0.09, then 0.27 scored worse


def test_a_sweep_runs_the_updates_a_final_run_makes(quality):
    assert quality.updates(8476, 1) == 265  # 264 full batches of 32 and a last one of 28, as the trainer runs them
    assert quality.updates(64, 2) == 4


def test_finished_runs_are_kept_on_disk_and_replayed(quality, task, monkeypatch, tmp_path):
    """The full table takes hours: a rerun replays every finished run from runs/quality/ and trains only the rest;
    anything a run depends on (rate, seed, rows) is in its key."""
    calls = []

    def fake(setup, lr, seed, data, epochs, train, val, steps, head_lr):
        calls.append((lr, seed, len(train)))
        return {"accuracy": lr * 10 + seed}

    monkeypatch.setattr(quality, "train_and_score", fake)
    setup = quality.setups(task)[2]
    monkeypatch.setattr(quality, "MEMO", quality.Memo(tmp_path / "memo.json"))
    first = quality.run(setup, 1e-2, 0, task, epochs=1)
    assert quality.run(setup, 1e-2, 0, task, epochs=1) == first and len(calls) == 1
    monkeypatch.setattr(quality, "MEMO", quality.Memo(tmp_path / "memo.json"))  # a new sitting: from the file
    assert quality.run(setup, 1e-2, 0, task, epochs=1)["accuracy"] == first["accuracy"] and len(calls) == 1
    quality.run(setup, 1e-2, 1, task, epochs=1)
    quality.run(setup, 3e-2, 0, task, epochs=1)
    quality.run(setup, 1e-2, 0, task, epochs=1, train=task.train[:-1])
    assert len(calls) == 4
    assert quality.MEMO.seconds() == pytest.approx(sum(r["wall_s"] for r in quality.MEMO.runs.values()))
