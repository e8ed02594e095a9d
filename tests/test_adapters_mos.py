"""MoS: each differentiation strategy at work, the parameter formula, and gradients into the shared pools."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.adapters.model import adapter_modules
from memfit.adapters.mos import MoSLinear

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(layers: int = 8) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def mos_layers(model) -> dict[str, MoSLinear]:
    return {n: m for n, m in adapter_modules(model) if isinstance(m, MoSLinear)}


def test_parameter_count_is_req_L_din_plus_dout():
    config = memfit.MoSConfig(r=8, r_eq=4, r_pri=2, shards=4, target_modules=PROJ)
    model = memfit.inject(llama(4), config)
    trainable, _ = memfit.trainable_parameters(model)
    expected = 0
    for kind in PROJ:
        layer = model.get_submodule(f"model.layers.0.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}")
        expected += config.r_eq * 4 * (layer.in_features + layer.out_features)
        a, b = model.memfit_shared.A[kind], model.memfit_shared.B[kind]
        assert a.numel() + b.numel() == config.r_eq * 4 * (layer.in_features + layer.out_features)
    assert trainable == expected


def test_private_shards_are_used_by_their_layer_only():
    config = memfit.MoSConfig(r=8, r_eq=4, r_pri=2, shards=4, target_modules=["q_proj"])
    layers = list(mos_layers(memfit.inject(llama(4), config)).values())
    n_pub = (config.r_eq - config.r_pri) * 4 * config.shards
    privates = []
    for i, layer in enumerate(layers):
        for idx in (layer.idx_A, layer.idx_B):
            private = set(idx[idx >= n_pub].tolist())
            start = n_pub + i * config.r_pri * config.shards
            assert private == set(range(start, start + config.r_pri * config.shards))
        privates.append(private)
    for i, mine in enumerate(privates):  # nobody else touches a layer's private range
        for j, other in enumerate(layers):
            if i != j:
                assert not mine & set(other.idx_A.tolist()) and not mine & set(other.idx_B.tolist())


def test_privatization_off_uses_public_pool_only():
    config = memfit.MoSConfig(r=8, r_eq=4, r_pri=0, shards=4, target_modules=["q_proj"])
    for layer in mos_layers(memfit.inject(llama(4), config)).values():
        assert layer.idx_A.max() < config.r_eq * 4 * config.shards


def test_dissociation_draws_independent_indices_for_a_and_b():
    on = mos_layers(memfit.inject(llama(), memfit.MoSConfig(target_modules=["v_proj"])))
    off = mos_layers(memfit.inject(llama(), memfit.MoSConfig(target_modules=["v_proj"], dissociation=False)))
    assert all(not torch.equal(m.idx_A, m.idx_B) for m in on.values())
    assert all(torch.equal(m.idx_A, m.idx_B) for m in off.values())


def test_subset_selection_differs_across_layers_and_is_drawn_without_replacement():
    on = list(mos_layers(memfit.inject(llama(), memfit.MoSConfig(target_modules=["q_proj"]))).values())
    off_cfg = memfit.MoSConfig(target_modules=["q_proj"], subset_selection=False)
    off = list(mos_layers(memfit.inject(llama(), off_cfg)).values())
    for m in on:
        assert len(set(m.idx_A.tolist())) == m.idx_A.numel()
    public = (16 - 2) * 4
    assert not torch.equal(on[0].idx_A[:public], on[1].idx_A[:public])
    assert torch.equal(off[0].idx_A[:public], off[1].idx_A[:public])


def test_vector_sharding_assembles_rows_from_l_shards():
    config = memfit.MoSConfig(r=8, r_eq=4, r_pri=2, shards=4, target_modules=["q_proj"])
    model = memfit.inject(llama(), config)
    layer = mos_layers(model)["model.layers.2.self_attn.q_proj"]
    with torch.no_grad():
        for p in model.memfit_shared.B.values():
            p.normal_()
    a, b = layer.factors()
    pool_a, pool_b = model.memfit_shared.A["q_proj"], model.memfit_shared.B["q_proj"]
    for j in range(config.r):
        shards = layer.idx_A[j * 4:(j + 1) * 4]
        assert torch.equal(a[j], torch.cat([pool_a[s] for s in shards]))
        assert torch.equal(b[:, j], torch.cat([pool_b[s] for s in layer.idx_B[j * 4:(j + 1) * 4]]))
    assert a.shape == (config.r, 32) and pool_a.shape[1] == 32 // 4


def test_one_pool_per_kind_shared_by_all_layers_gets_gradients_from_each():
    model = memfit.inject(llama(), memfit.MoSConfig(target_modules=["q_proj"], dropout=0.0))
    with torch.no_grad():
        model.memfit_shared.B["q_proj"].normal_()
    x = torch.randint(0, 64, (2, 6))
    model(x, labels=x).loss.backward()
    grad = model.memfit_shared.A["q_proj"].grad
    for layer in mos_layers(model).values():  # every layer's shards receive gradient
        assert grad[layer.idx_A].abs().sum() > 0
    assert sum(1 for _ in model.memfit_shared.parameters()) == 2


def test_indices_are_seeded_and_saved(tmp_path):
    config = memfit.MoSConfig(target_modules=["q_proj", "v_proj"], seed=7)
    a = memfit.inject(llama(), config)
    b = memfit.inject(llama(), config)
    other = memfit.inject(llama(), memfit.MoSConfig(target_modules=["q_proj", "v_proj"], seed=8))
    la, lb, lo = (list(mos_layers(m).values()) for m in (a, b, other))
    assert all(torch.equal(x.idx_A, y.idx_A) for x, y in zip(la, lb, strict=True))
    assert not all(torch.equal(x.idx_A, y.idx_A) for x, y in zip(la, lo, strict=True))
    memfit.save_adapter(other, tmp_path)
    loaded = memfit.load_adapter(llama(), tmp_path)
    assert all(torch.equal(x.idx_A, y.idx_A) for x, y in zip(lo, mos_layers(loaded).values(), strict=True))


@pytest.mark.parametrize("strategy", [{}, {"dissociation": False}, {"subset_selection": False},
                                      {"r_pri": 0}, {"shards": 1}])
def test_merge_matches_unmerged_for_every_ablation(strategy, tokens):
    model = memfit.inject(tiny_llama(), memfit.MoSConfig(r=6, target_modules=PROJ, dropout=0.0, **strategy)).eval()
    with torch.no_grad():
        for p in model.memfit_shared.B.values():
            p.normal_(std=0.1)
        before = model(tokens).logits
        memfit.merge(model)
        after = model(tokens).logits
    assert (before - after).abs().max() <= 1e-5 * before.abs().max()
