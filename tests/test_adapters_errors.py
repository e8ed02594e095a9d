"""Bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
from conftest import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.errors import AdapterMismatchError, CheckpointError, ConfigError, TargetNotFoundError


def test_unknown_target_lists_existing_modules(llama):
    with pytest.raises(TargetNotFoundError, match=r"qproj.*exist.*'q_proj'"):
        memfit.inject(llama, memfit.LoraConfig(target_modules=["qproj"]))


def test_req_above_r():
    with pytest.raises(ConfigError, match="r_eq=8 > r=4"):
        memfit.MoSConfig(r=4, r_eq=8)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be > 0"), ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_lora_config_ranges(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        memfit.LoraConfig(**kwargs)


def test_unknown_config_field():
    with pytest.raises(ConfigError, match="unknown LoraConfig fields"):
        memfit.LoraConfig.from_dict({"method": "lora", "rank": 4})


def test_dimension_not_divisible_by_shards(llama):
    with pytest.raises(ConfigError, match="not divisible by shards=5"):
        memfit.inject(llama, memfit.MoSConfig(r=6, shards=5, target_modules=["q_proj"]))


def test_too_few_layers_for_active_rank(llama):
    with pytest.raises(ConfigError, match="lower r or raise r_eq"):
        memfit.inject(llama, memfit.MoSConfig(r=16, target_modules=["q_proj"]))  # explicit: stays an error


def test_default_active_rank_fits_any_depth(llama):
    """The paper's r=16 assumes 32 layers; left unset, r is what a 2-layer model's pools hold, and it says so."""
    memfit.inject(llama, memfit.MoSConfig(target_modules=["q_proj", "v_proj"]))
    assert llama.memfit_config.r == 2 + (4 - 2) * 2 and llama.memfit_config.shards == 4
    assert "active rank r=6, not the paper's 16" in llama.memfit_notes[0]


def test_second_injection_is_refused(llama):
    memfit.inject(llama, memfit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="already has a memfit adapter"):
        memfit.inject(llama, memfit.LoraConfig(target_modules=["v_proj"]))


def test_missing_files(tmp_path, llama):
    with pytest.raises(CheckpointError, match="missing file .*adapter_config.json"):
        memfit.load_adapter(llama, tmp_path)
    memfit.save_adapter(memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"])), tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file .*adapter.safetensors"):
        memfit.load_adapter(llama, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(tmp_path, damage):
    memfit.save_adapter(memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"])), tmp_path)
    path = tmp_path / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        memfit.load_adapter(tiny_llama(), tmp_path)


def test_corrupt_config_json(tmp_path):
    memfit.save_adapter(memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"])), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        memfit.load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_another_model_size_names_module_and_shapes(tmp_path):
    memfit.save_adapter(memfit.inject(tiny_llama(), memfit.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterMismatchError, match=r"model.layers.0.self_attn.q_proj.*\(2, 32\).*\(2, 48\)"):
        memfit.load_adapter(wider, tmp_path)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    model = memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="cannot write"):
        memfit.save_adapter(model, blocker / "adapter")


def test_export_of_non_lora_model_without_adapter(llama, tmp_path):
    with pytest.raises(ConfigError, match="no memfit adapter"):
        memfit.export_peft(llama, tmp_path)
