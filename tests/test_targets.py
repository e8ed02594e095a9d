"""Default targets come from the model itself: PEFT's mapping where it knows the type, else the structure."""

from __future__ import annotations

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch import nn

import memfit
from memfit.adapters.targets import default_targets
from memfit.errors import ConfigError


class BrandNewAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query_proj, self.key_proj, self.value_proj, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.out(self.query_proj(x) + self.key_proj(x) + self.value_proj(x))


class BrandNewModel(nn.Module):
    """An architecture no table has ever heard of."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": "brand-new-arch"})()
        self.blocks = nn.ModuleList([BrandNewAttention(d) for _ in range(2)])
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.mlp(x)


def test_an_unknown_model_type_gets_its_query_and_value_projections():
    assert "brand-new-arch" not in PEFT_DEFAULTS
    model = memfit.inject(BrandNewModel(), memfit.LoraConfig(r=2))
    assert model.memfit_targets == [f"blocks.{i}.{k}" for i in range(2) for k in ("query_proj", "value_proj")]


@pytest.mark.parametrize("model_type, expected", [("phi3", ["qkv_proj"]), ("qwen3_moe", ["q_proj", "v_proj"]),
                                                  ("olmoe", ["q_proj", "v_proj"])])
def test_hf_architectures_peft_does_not_list(model_type, expected):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert model_type not in PEFT_DEFAULTS  # else this test would test PEFT's table
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, pad_token_id=0)
    torch.manual_seed(0)
    assert default_targets(AutoModelForCausalLM.from_config(config)) == expected


def test_peft_mapping_first(llama):
    assert default_targets(llama) == PEFT_DEFAULTS["llama"]


def test_no_attention_found_is_a_clear_error():
    with pytest.raises(ConfigError, match="found no attention query/value projections.*pass target_modules"):
        memfit.inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), memfit.LoraConfig())
