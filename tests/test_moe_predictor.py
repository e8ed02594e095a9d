"""Routing traces, the routing-path predictor (train, save, load, use) and the cross-layer gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_moe_models import VOCAB, one_thread, save, tiny_moe  # noqa: F401 (autouse fixture)
from test_moe_parity import TOL, batch, rel_err, run

import memfit.moe as moe
from memfit.moe.evaluate import predictor_accuracy
from memfit.moe.trace import record

K, E = 2, 8
# Accuracy floors (top-2 of 8). Chance is 2/8 = 0.25, and always guessing each layer's two most used experts gets
# 0.29-0.36 on these models. Measured on the tiny Mixtral (model seeds 0-3 x window/training seeds 0-2): the
# cross-layer gate 0.79-0.91 (0.87 / 0.91 here), the routing-path predictor 0.79-0.86 (0.86 / 0.80 here); with
# planted bugs, the gate on the wrong layer's router 0.23-0.30 and a predictor of random experts ~0.25.
CROSS_LAYER_FLOOR = 0.75
ROUTING_PATH_FLOOR = 0.72


def windows(n: int = 24, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def small_trace(path: Path, n: int = 24, seed: int = 0) -> moe.Trace:
    model = moe.load(path, expert_budget="100%", policy="lru", predictor=None)
    try:
        return record(model, windows(n, seed=seed))
    finally:
        model.memfit_moe.close()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = tiny_moe("mixtral")
    return model, save(model, tmp_path_factory.mktemp("mixtral"))


def test_trace_records_the_models_routing(mixtral, tmp_path):
    model, path = mixtral
    trace = small_trace(path, n=4)
    chosen, first_input = {}, []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: chosen.update({i: out[2]}))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: first_input.append(a[0])))
    with torch.no_grad():
        model(input_ids=windows(4), use_cache=False)
    for h in hooks:
        h.remove()
    assert trace.routes.shape == (4 * 32, 3, K) and trace.layers == [0, 1, 2]
    for i in range(3):
        assert torch.equal(trace.routes[:, i].long(), chosen[i])
    assert torch.allclose(trace.features.float(), first_input[0].reshape(-1, 32), atol=1e-2)
    trace.save(tmp_path / "t.safetensors")
    again = moe.Trace.load(tmp_path / "t.safetensors")
    assert torch.equal(again.routes, trace.routes) and again.fingerprint == trace.fingerprint


def test_routing_path_predictor_learns_routing_and_round_trips(mixtral, tmp_path):
    _, path = mixtral
    trace = small_trace(path, n=48)
    config = moe.PredictorConfig(width=64, epochs=30, batch_size=128, lr=3e-3, holdout=0.25)
    predictor = moe.RoutingPath.train(trace, config)
    # held-out tokens (the trace's tail)
    assert len(predictor.accuracy) == 2 and min(predictor.accuracy) > ROUTING_PATH_FLOOR, predictor.accuracy
    predictor.save(tmp_path / "p.safetensors")
    loaded = moe.RoutingPath.load(tmp_path / "p.safetensors")
    x = trace.features[:50].float()
    assert torch.equal(loaded.predict(0, x)[1].topk, predictor.predict(0, x)[1].topk)
    assert loaded.accuracy == pytest.approx(predictor.accuracy)
    assert loaded.predict(1, x) == []  # it predicts once per step, at the first MoE layer

    # the offline measure (trace) and the online one (hooks on the running model) agree
    model = moe.load(path, expert_budget="50%", predictor=tmp_path / "p.safetensors")
    try:
        online = predictor_accuracy(model, windows(6, seed=5), loaded)
    finally:
        model.memfit_moe.close()
    offline = loaded.accuracy_on(small_trace(path, n=6, seed=5))
    assert list(online) == [1, 2] and list(online.values()) == pytest.approx(offline, abs=1e-6)


def test_predictive_policy_with_routing_path_keeps_logits_and_prefetches(mixtral, tmp_path):
    reference, path = mixtral
    config = moe.PredictorConfig(width=64, epochs=10, batch_size=128)
    predictor = moe.RoutingPath.train(small_trace(path, n=48), config)
    predictor.save(tmp_path / "p.safetensors")
    ids, mask = batch()
    ref = run(reference, ids, mask)
    model = moe.load(path, expert_budget="25%", policy="predictive", predictor=tmp_path / "p.safetensors")
    try:
        got = run(model, ids, mask)
        stats = model.memfit_moe.stats
    finally:
        model.memfit_moe.close()
    assert rel_err(got[0], ref[0]) <= TOL and rel_err(got[1], ref[1]) <= TOL and torch.equal(got[2], ref[2])
    assert stats.prefetch_issued > 0 and stats.prefetch_used > 0


def test_cross_layer_gate_predicts_the_next_layer(mixtral):
    _, path = mixtral
    model = moe.load(path, expert_budget="100%", policy="lru", predictor=None)
    runtime = model.memfit_moe
    gate = moe.CrossLayerGate(runtime.layers, runtime.arch)
    try:
        accuracy = predictor_accuracy(model, windows(6), gate)
    finally:
        runtime.close()
    assert list(accuracy) == [1, 2]  # layer 0 has no layer before it
    assert all(CROSS_LAYER_FLOOR < a <= 1.0 for a in accuracy.values()), accuracy
