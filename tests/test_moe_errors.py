"""Bad input to memfit.moe.load: clear errors that name the problem and the fix, and nothing half-loaded."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_moe_models import one_thread, save, tiny_moe  # noqa: F401 (autouse fixture)

import memfit.moe as moe
from memfit.errors import CheckpointError, ConfigError


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def clean():
    """Asserts a failing load leaves no thread running and no file open."""
    gc.collect()  # files of earlier tests' dropped objects close now, not in the middle of this one
    threads, fds = threading.active_count(), _open_fds()
    yield
    gc.collect()
    assert threading.active_count() == threads
    assert _open_fds() == fds


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return save(tiny_moe("mixtral"), tmp_path_factory.mktemp("mixtral"))


def test_budget_below_one_layers_top_k_states_the_minimum(mixtral_dir, clean):
    probe = moe.load(mixtral_dir, expert_budget="100%", policy="lru", predictor=None)
    expert = probe.memfit_moe.store.expert_bytes
    probe.memfit_moe.close()
    with pytest.raises(ConfigError, match=rf"holds 1 expert.*top-2 experts need at least .*\({2 * expert} bytes"):
        moe.load(mixtral_dir, expert_budget=str(2 * expert - 1))
    with pytest.raises(ConfigError, match=r"top-2 experts need at least .*8\.33% of all expert bytes"):
        moe.load(mixtral_dir, expert_budget="5%")
    for bad in ("0%", "150%", "abc%", "12 parsecs"):
        with pytest.raises(ConfigError):
            moe.load(mixtral_dir, expert_budget=bad)


def test_models_without_moe_layers(tmp_path, llama, clean):
    save(llama, tmp_path / "llama")
    with pytest.raises(ConfigError, match=r"cannot offload model_type 'llama'.*supports \['deepseek_v3', 'mixtral'"):
        moe.load(tmp_path / "llama")
    dense = tiny_moe("qwen2_moe")
    dense.config.mlp_only_layers = [0, 1, 2]  # a Qwen2-MoE config whose every layer is dense
    from transformers import AutoModelForCausalLM

    save(AutoModelForCausalLM.from_config(dense.config), tmp_path / "dense")
    with pytest.raises(ConfigError, match="has no MoE layers"):
        moe.load(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="no config.json"):
        moe.load(tmp_path)


def _rewrite(src: Path, dst: Path, drop: str | None = None) -> None:
    """Copy a single-file checkpoint, leaving out tensor `drop`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
    save_file(tensors, dst / "model.safetensors")


def test_missing_expert_tensor_names_the_key_and_file(tmp_path, mixtral_dir, clean):
    key = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    _rewrite(mixtral_dir, tmp_path / "single", drop=key)
    with pytest.raises(CheckpointError, match=rf"expert 5 of layer 1 .*'{key}' is not in .*single/model.safetensors"):
        moe.load(tmp_path / "single")

    sharded = save(tiny_moe("mixtral"), tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    with safe_open(str(sharded / shard), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != key}  # noqa: SIM118
    save_file(kept, sharded / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{key}' is not in .*{shard}"):
        moe.load(sharded)


def test_truncated_shard_names_the_key_and_file(tmp_path, clean):
    sharded = save(tiny_moe("mixtral"), tmp_path / "m", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.block_sparse_moe.experts.7.w2.weight"]
    path = sharded / shard
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '.*experts.*' lies outside the file.*truncated"):
        moe.load(sharded)


def test_expert_with_the_wrong_shape(tmp_path, mixtral_dir, clean):
    key = "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    _rewrite(mixtral_dir, tmp_path / "m", drop=key)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[key] = torch.zeros(48, 32)  # transposed
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{key}' .* shape \[48, 32\].*expects shape \[32, 48\]"):
        moe.load(tmp_path / "m")


def test_predictor_trained_for_another_model(tmp_path, mixtral_dir, clean):
    from test_moe_predictor import small_trace

    other = save(tiny_moe("mixtral", seed=1), tmp_path / "other")  # same shapes, other routers
    predictor = moe.RoutingPath.train(small_trace(other), moe.PredictorConfig(width=16, epochs=1, batch_size=64))
    predictor.save(tmp_path / "p.safetensors")
    with pytest.raises(ConfigError, match=r"trained for another model .*memfit moe trace"):
        moe.load(mixtral_dir, predictor=tmp_path / "p.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="not a memfit routing-path predictor"):
        moe.load(mixtral_dir, predictor=tmp_path / "junk.safetensors")


def test_unknown_policy_and_predictor(mixtral_dir, clean):
    with pytest.raises(ConfigError, match=r"unknown cache policy 'mru'; choose one of \['lfu', 'lru'"):
        moe.load(mixtral_dir, policy="mru")
    with pytest.raises(ConfigError, match="unknown predictor 'oracle'"):
        moe.load(mixtral_dir, predictor="oracle")
    with pytest.raises(ConfigError, match="policy 'predictive' works from predictions"):
        moe.load(mixtral_dir, policy="predictive", predictor=None)
    with pytest.raises(ConfigError, match="io_threads must be >= 1"):
        moe.load(mixtral_dir, io_threads=0)


def test_a_dropped_model_stops_its_prefetch_thread(mixtral_dir, clean):
    import gc

    model = moe.load(mixtral_dir, expert_budget="50%")
    assert any(t.name == "memfit-prefetch" for t in threading.enumerate())
    del model
    gc.collect()  # the `clean` fixture then checks that no thread and no file is left
