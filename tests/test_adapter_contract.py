"""The adapter contract as a table: every registered method through every invariant.

Parametrised over `memfit.adapters.methods()`, so a method added to the registry is in the table automatically
(and fails `test_trainable_parameters_equal_the_methods_formula` until its formula is written here). Each method
runs with its default config on a small Llama, its trainable tensors moved off their initialisation (B = 0 would
make most checks vacuous), and is checked against independent references: a fresh model, PEFT, and parameter
counts derived from the model's shapes.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.adapters import config_from_dict, get_method, methods
from memfit.adapters.model import adapter_modules
from memfit.errors import ConfigError

METHODS = list(methods())
X = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def base(seed: int = 0) -> LlamaForCausalLM:
    """hidden 128 so that every method's defaults fit (Compacter: k = 128 // 32 = 4, divisible by n = 4)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def adapted(name: str) -> LlamaForCausalLM:
    model = memfit.inject(base(), get_method(name).config_cls())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # trained-looking values: B != 0, γ != 1, ...
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


def test_the_adapter_changes_the_model(method):
    """Guards the other checks: an adapter that did nothing would pass them all."""
    assert not torch.allclose(logits(adapted(method)), logits(base()), atol=1e-4)


def test_save_then_load_gives_equal_logits(method, tmp_path):
    model = adapted(method)
    memfit.save_adapter(model, tmp_path)
    fresh = base()
    torch.manual_seed(7)  # the adapter is initialised otherwise: only what was saved may matter
    loaded = memfit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_config_round_trips_through_json(method):
    model = adapted(method)
    for config in (get_method(method).config_cls(), model.memfit_config):  # as given, and as resolved on the model
        again = config_from_dict(json.loads(config.to_json()))
        assert type(again) is type(config) and again == config


def test_merge_equals_unmerged_or_is_refused(method):
    model = adapted(method)
    spec = get_method(method)
    before = logits(model)
    if spec.merge_error:
        with pytest.raises(ConfigError, match="cannot be merged"):
            memfit.merge(model)
        return
    memfit.merge(model)
    assert torch.allclose(logits(model), before, rtol=1e-5, atol=1e-5)
    memfit.unmerge(model)
    assert torch.allclose(logits(model), before, rtol=1e-5, atol=1e-5)


def _is_ba(model: nn.Module) -> bool:
    layers = [m for _, m in adapter_modules(model)]
    return bool(layers) and all(hasattr(m, "lora_factors") for m in layers)


def test_export_peft_is_exact_or_refused(method, tmp_path):
    from peft import PeftModel

    model = adapted(method)
    if not _is_ba(model):
        with pytest.raises(ConfigError, match="not a B·A adapter"):
            memfit.export_peft(model, tmp_path)
        return
    memfit.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base(), tmp_path).eval()
    assert torch.allclose(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)


def test_import_peft_round_trip(method, tmp_path):
    model = adapted(method)
    if not _is_ba(model):
        pytest.skip(f"{method} is not a B·A adapter (its export is refused above)")
    memfit.export_peft(model, tmp_path)
    imported = memfit.import_peft(base(), tmp_path)
    assert torch.allclose(logits(imported), logits(model), rtol=1e-5, atol=1e-5)


def test_import_peft_honours_rank_and_alpha_patterns(tmp_path):
    """An adapter PEFT itself wrote, with per-module ranks and alphas: memfit gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
                        alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.q_proj": 2})
    peft_model = get_peft_model(base(), config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path)
    ours = memfit.import_peft(base(), tmp_path)
    layers = dict(adapter_modules(ours))
    assert layers["model.layers.1.self_attn.q_proj"].r == 2 and layers["model.layers.0.self_attn.q_proj"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].scale == 32 / 4
    assert layers["model.layers.0.self_attn.q_proj"].scale == 2 / 4
    assert torch.allclose(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-6)


# -- parameter counts, from the model's shapes (not from memfit's modules) ------------------------------------------
def _targets(model: nn.Module) -> list[nn.Linear]:
    return [model.get_submodule(n) for n in model.memfit_targets]


def _kinds(model: nn.Module) -> dict[str, list[nn.Linear]]:
    kinds: dict[str, list[nn.Linear]] = {}
    for name in model.memfit_targets:
        kinds.setdefault(name.rpartition(".")[2], []).append(model.get_submodule(name))
    return kinds


def _lora(model, c) -> int:
    return sum(c.r * (m.in_features + m.out_features) for m in _targets(model))


def _mos(model, c) -> int:  # one pool pair per kind: N = r_eq·L·l rows of d_in/l and d_out/l
    return sum(c.r_eq * len(ms) * (ms[0].in_features + ms[0].out_features) for ms in _kinds(model).values())


def _increlora(model, c) -> int:  # active A, e, B of init_rank components, plus each module's trained reserve a, b
    step = c.rank_step or max(1, c.target_rank // 2)
    return sum(c.init_rank * (m.in_features + m.out_features + 1) + step * (m.in_features + m.out_features)
               for m in _targets(model))


def _adalora(model, c) -> int:
    return sum(c.init_rank * (m.in_features + m.out_features + 1) for m in _targets(model))


def _norms(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "norm" in n)


def _difffit(model, c) -> int:  # γ per output channel of each block output, the norms (Llama has no biases)
    return sum(m.out_features for m in _targets(model)) + _norms(model)


def _compacter(model, c) -> int:  # shared A [n, n, n]; per PHM layer s [n, in/n] + t [n, out/n]; down d->k, up k->d
    return c.n ** 3 + sum(2 * (m.out_features + m.out_features // c.reduction) for m in _targets(model))


def _rps(model, c) -> int:  # z of compression × the compressed weights (the tied head counts once), and the norms
    config = model.config
    dense = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    per_layer = (2 * config.hidden_size * config.hidden_size  # q, o
                 + 2 * config.hidden_size * (config.hidden_size * config.num_key_value_heads
                                             // config.num_attention_heads)  # k, v
                 + 3 * config.hidden_size * config.intermediate_size)  # gate, up, down
    return round(c.compression * (dense + config.num_hidden_layers * per_layer)) + _norms(model)


def _full(model, c) -> int:  # every weight of the model (the tied head counts once)
    config = model.config
    per_layer = (2 * config.hidden_size * config.hidden_size
                 + 2 * config.hidden_size * (config.hidden_size * config.num_key_value_heads
                                             // config.num_attention_heads)
                 + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size)  # + 2 norms
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.vocab_size * config.hidden_size + head + config.num_hidden_layers * per_layer + config.hidden_size


FORMULAS = {"lora": _lora, "mos": _mos, "increlora": _increlora, "adalora": _adalora, "difffit": _difffit,
            "compacter": _compacter, "rps": _rps, "full": _full}


def test_trainable_parameters_equal_the_methods_formula(method):
    assert method in FORMULAS, f"method {method!r} is registered but has no parameter formula in this table"
    model = adapted(method)
    assert memfit.trainable_parameters(model)[0] == FORMULAS[method](model, model.memfit_config)
