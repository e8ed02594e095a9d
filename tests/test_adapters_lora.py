"""memfit LoRA against PEFT LoRA carrying the same weights; merge, save/load, export/import."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama

import memfit
from memfit.adapters.model import adapter_modules


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor non-zero values so that parity is not trivially B = 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _peft_with_same_weights(model: torch.nn.Module, config: memfit.LoraConfig) -> peft.PeftModel:
    ref = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules, lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, module in adapter_modules(model):
            peft_layer = ref.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    return ref.eval()


def test_lora_matches_peft_before_and_after_merge(tokens):
    config = memfit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = memfit.inject(tiny_llama(), config).eval()
    _randomise(model)
    ref = _peft_with_same_weights(model, config)
    with torch.no_grad():
        base = tiny_llama()(tokens).logits
        expected = ref(tokens).logits
        got = model(tokens).logits
        assert _rel(expected, base) > 1e-3  # the adapter really changes the output
        assert _rel(got, expected) <= 1e-5
        memfit.merge(model)
        assert _rel(model(tokens).logits, expected) <= 1e-5
        ref.merge_adapter()
        assert _rel(model(tokens).logits, ref(tokens).logits) <= 1e-5
        memfit.unmerge(model)
        assert _rel(model(tokens).logits, expected) <= 1e-5


def test_inject_freezes_base_and_counts(llama):
    model = memfit.inject(llama, memfit.LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = memfit.trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"model.layers.{i}.self_attn.q_proj.{t}" for i in range(2) for t in ("lora_A", "lora_B")]
    assert trainable == 2 * 2 * (32 + 32)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    # base checkpoint keys are unchanged: adapters add, they do not rename
    assert set(tiny_llama().state_dict()) <= set(model.state_dict())


def test_regex_targets_and_all_linear(llama):
    model = memfit.inject(llama, memfit.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert model.memfit_targets == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    every = memfit.inject(tiny_llama(), memfit.LoraConfig(target_modules="all-linear"))
    assert len(every.memfit_targets) == 2 * 7 and "lm_head" not in every.memfit_targets


def test_modules_to_save_trains_head_and_round_trips(tmp_path):
    config = memfit.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = memfit.inject(tiny_bert(), config)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trained
    _randomise(model)
    memfit.save_adapter(model, tmp_path)
    loaded = memfit.load_adapter(tiny_bert(), tmp_path).eval()
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, loaded(x).logits)


@pytest.mark.parametrize("method", ["lora", "mos"])
def test_export_peft_loads_in_peft_with_same_logits(tmp_path, tokens, method):
    if method == "lora":
        config = memfit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        config = memfit.MoSConfig(r=6, r_eq=4, r_pri=2, shards=4, target_modules=["q_proj", "v_proj", "o_proj"])
    model = memfit.inject(tiny_llama(), config).eval()
    _randomise(model)
    memfit.export_peft(model, tmp_path / "peft")
    ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert _rel(ref(tokens).logits, model(tokens).logits) <= 1e-5
    back = memfit.import_peft(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert _rel(back(tokens).logits, model(tokens).logits) <= 1e-5


def test_export_classifier_with_head_loads_in_peft(tmp_path):
    config = memfit.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = memfit.inject(tiny_bert(), config).eval()
    _randomise(model)
    memfit.export_peft(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert _rel(ref(x).logits, model(x).logits) <= 1e-5


def test_import_peft_adapter_trained_by_peft(tmp_path, tokens):
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "up_proj"],
                                                             rank_pattern={"model.layers.1.mlp.up_proj": 5}))
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    model = memfit.import_peft(tiny_llama(), tmp_path).eval()
    assert model.get_submodule("model.layers.1.mlp.up_proj").r == 5
    with torch.no_grad():
        assert _rel(model(tokens).logits, ref.eval()(tokens).logits) <= 1e-5


def test_config_json_round_trip():
    for config in (memfit.LoraConfig(r=3, target_modules=["q_proj"], rank_pattern={"x": 2}),
                   memfit.MoSConfig(r=8, r_eq=2, r_pri=1, dissociation=False)):
        again = type(config).from_json(config.to_json())
        assert again == config
        assert memfit.adapters.config_from_dict(config.to_dict()) == config


def test_injected_model_still_copies(llama):
    model = memfit.inject(llama, memfit.LoraConfig(target_modules=["q_proj"]))
    clone = copy.deepcopy(model)
    assert clone.memfit_targets == model.memfit_targets
