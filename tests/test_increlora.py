"""IncreLoRA: growth on schedule within the budget, advance learning, restart warmup, hooks, export, save/load."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_llama

import memfit
from memfit.adapters.model import adapter_modules
from memfit.errors import ConfigError

TARGETS = ["q_proj", "v_proj"]  # 4 modules in the 2-layer tiny Llama
# budget 4 × 3 = 12 from 4: event 1 grows 2 modules by 3, event 2 grows 1 module by the 2 that are left
CONFIG = dict(target_modules=TARGETS, init_rank=1, target_rank=3, top_h=2, rank_step=3, t_init=3, interval=4,
              restart_warmup=2)
TOTAL = 14
CONFIG_RESERVE_E = memfit.IncreLoRAConfig().reserve_e


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 12), generator=gen) for _ in range(n)]


def _setup(scheduler: bool = True, **overrides):
    torch.manual_seed(0)
    model = memfit.inject(tiny_llama(), memfit.IncreLoRAConfig(**{**CONFIG, **overrides})).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0) if scheduler else None
    return model, opt, sched, memfit.rank_allocator(model, total_steps=TOTAL)


def _train(model, opt, sched, alloc, steps: int, start: int = 1, each=None) -> dict[int, dict]:
    events = {}
    for step, x in enumerate(_batches(steps + start - 1)[start - 1:], start=start):
        (model(input_ids=x, labels=x).loss + alloc.regularization()).backward()
        opt.step()
        if sched is not None:
            sched.step()
        event = alloc.step(step, opt, sched)
        if each is not None:
            each(step)
        opt.zero_grad()
        if event is not None:
            events[step] = event
    return events


def test_growth_at_scheduled_steps_only_and_never_past_the_budget():
    model, opt, sched, alloc = _setup()
    assert alloc.growth_steps() == [4, 8]  # after t_init=3, every 4 steps, until the budget is full
    totals, scores = [], {}

    def each(step):
        totals.append(sum(alloc.ranks().values()))
        scores[step] = alloc.scores()

    events = _train(model, opt, sched, alloc, TOTAL, each=each)
    assert sorted(events) == [4, 8]
    names = list(alloc.modules)
    assert bool((scores[4] > 0).all())  # the ΔW hooks measured every module
    assert set(events[4]["grown"]) == {names[i] for i in scores[4].argsort(descending=True)[:2].tolist()}
    assert set(events[8]["grown"]) == {names[int(scores[8].argmax())]}
    assert [e["event"] for e in events.values()] == ["grow", "grow"]
    assert sorted(events[4]["grown"].values()) == [3, 3] and list(events[8]["grown"].values()) == [2]
    assert totals == [4, 4, 4, 10, 10, 10, 10, 12, 12, 12, 12, 12, 12, 12]
    assert max(totals) == alloc.target_total_rank == 12


def test_reserve_components_train_through_their_frozen_e():
    model, opt, sched, alloc = _setup()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    before_a = [a.detach().clone() for a in layer.lora_A]
    _train(model, opt, sched, alloc, 3)  # before the first growth
    reserve = range(1, len(layer.lora_A))
    assert len(reserve) == 3 and layer.k == 1
    for i in reserve:
        assert not layer.lora_E[i].requires_grad and layer.lora_E[i].item() == pytest.approx(1e-5)
        assert layer.lora_A[i].requires_grad and not torch.equal(layer.lora_A[i], before_a[i])
    # Adam normalises the 1e-5-scaled gradient: the reserve learns about as fast as the active component
    moved = [(layer.lora_A[i] - before_a[i]).abs().mean().item() for i in range(len(before_a))]
    assert min(moved[1:]) > 0.1 * moved[0]


def test_new_parameters_join_the_optimizer_as_a_group_with_its_own_warmup():
    model, opt, sched, alloc = _setup()
    lrs = {}
    _train(model, opt, sched, alloc, TOTAL, each=lambda step: lrs.update({step: [g["lr"] for g in opt.param_groups]}))
    assert len(opt.param_groups) == 3  # the main group and one per growth event
    grown = [n for n, layer in adapter_modules(model) if layer.k > 1]
    new_ids = {id(p) for p in opt.param_groups[1]["params"]}
    for name in grown[:1]:
        layer = model.get_submodule(name)
        assert id(layer.lora_E[1]) in new_ids and layer.lora_E[1].requires_grad
        assert id(layer.lora_A[4]) in new_ids and id(layer.lora_B[4]) in new_ids  # the fresh reserve
        assert layer.lora_E[1].item() != pytest.approx(1e-5)  # activated e trains
    first_group = {id(p) for p in opt.param_groups[0]["params"]}
    assert not first_group & new_ids
    # group born at 4: warmup over 2 updates (0.5, 1.0 of the peak), then linear decay to 0 at update 14
    assert [round(lrs[s][1] / 1e-2, 6) for s in range(4, 15)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                                0.25, 0.125, 0.0]
    assert [round(lrs[s][2] / 1e-2, 6) for s in range(8, 15)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert all(lrs[s][0] == 1e-2 for s in lrs)  # the scheduler's own groups are untouched

    # without a scheduler the allocator sets the same learning rates itself
    model, opt, _, alloc = _setup(scheduler=False)
    own = {}
    _train(model, opt, None, alloc, TOTAL, each=lambda step: own.update({step: [g["lr"] for g in opt.param_groups]}))
    assert own == lrs


def _flops(layer: torch.nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(3, layer.in_features))
    return counter.get_total_flops()


def test_hooks_are_removed_when_the_budget_is_reached():
    model, opt, sched, alloc = _setup()
    _train(model, opt, sched, alloc, 7)
    layers = [layer for _, layer in adapter_modules(model)]
    assert all(layer.track_importance and layer.reserve_live for layer in layers)
    base_flops = 2 * 3 * 32 * 32  # the frozen Linear on 3 rows
    assert _flops(layers[0]) > 2 * base_flops  # while ranks grow, the forward builds the dense ΔW for the hook
    _train(model, opt, sched, alloc, 1, start=8)  # the budget is reached at step 8
    for layer in layers:
        assert not layer.track_importance and not layer.reserve_live
        assert all(e.item() == 0 for e in layer.lora_E[layer.active_chunks:])
    x = _batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    assert all(layer.take_score() is None for layer in layers)  # no hook ran
    assert _flops(layers[0]) < 1.5 * base_flops  # and now it is the cheap factored product again


def test_export_loads_in_peft_with_the_same_logits_mid_growth_and_at_the_end(tmp_path):
    model, opt, sched, alloc = _setup()
    x = _batches(1, seed=9)[0]
    for steps, start, name in ((5, 1, "mid"), (TOTAL - 5, 6, "end")):
        _train(model, opt, sched, alloc, steps, start=start)
        memfit.export_peft(model, tmp_path / name)
        ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / name).eval()
        with torch.no_grad():
            expected = model.eval()(x).logits
            assert torch.allclose(ref(x).logits, expected, rtol=1e-5, atol=1e-6)
        model.train()
    assert not torch.allclose(tiny_llama()(x).logits, expected, atol=1e-4)
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in ref.named_modules()
             if isinstance(getattr(m, "r", None), dict) and "default" in m.r}
    assert ranks == alloc.ranks()  # at the end the export holds exactly the allocated ranks


def test_save_load_keeps_the_grown_structure(tmp_path):
    model, opt, sched, alloc = _setup()
    _train(model, opt, sched, alloc, 5)  # grown once, reserve still live
    memfit.save_adapter(model, tmp_path)
    loaded = memfit.load_adapter(tiny_llama(), tmp_path).train()
    for name, layer in adapter_modules(model):
        twin = loaded.get_submodule(name)
        assert (twin.k, len(twin.lora_A), twin.reserve_live) == (layer.k, len(layer.lora_A), True)
        assert [e.requires_grad for e in twin.lora_E] == [e.requires_grad for e in layer.lora_E]
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)


def test_lora_init_starts_the_initial_components_like_lora_and_the_reserves_the_authors_way():
    """init="lora" starts the initial components as LoRA does (b = 0, a Kaiming-uniform, e = 1: ΔW = 0 and b takes
    the whole gradient at once); reserves keep the author's start, a frozen e = reserve_e and a, b ~ N(0, 0.02),
    and growth runs to the budget as with the default start."""
    model, opt, sched, alloc = _setup(init="lora")
    for _, layer in adapter_modules(model):
        a, e, b = layer.lora_A[0], layer.lora_E[0], layer.lora_B[0]
        assert not b.any() and torch.equal(e, torch.ones_like(e)) and e.requires_grad
        assert a.abs().max() <= layer.in_features ** -0.5 < 2 * a.std()
        assert not (b @ (a * e)).any()  # the initial components add nothing (the live reserve adds e = 1e-5's)
        reserve = layer.lora_E[1]
        assert not reserve.requires_grad and torch.equal(reserve, torch.full_like(reserve, CONFIG_RESERVE_E))
        assert 0.015 < layer.lora_B[1].std() < 0.025
    _train(model, opt, sched, alloc, TOTAL)
    assert sum(alloc.ranks().values()) == 4 * CONFIG["target_rank"]
    for _, layer in adapter_modules(model):
        assert layer.delta_weight().any()
        for i in range(1, layer.active_chunks):  # grown: e trains from 1, b's moments restarted at its growth
            assert layer.lora_E[i].requires_grad
            assert opt.state[layer.lora_B[i]]["step"] < opt.state[layer.lora_A[i]]["step"]


def test_a_component_grown_from_loras_start_keeps_its_product_with_e_folded_into_b():
    torch.manual_seed(0)
    layer = next(m for _, m in adapter_modules(memfit.inject(tiny_llama(), memfit.IncreLoRAConfig(
        **{**CONFIG, "init": "lora"}))))
    with torch.no_grad():
        layer.lora_A[1].normal_()  # as if learned in advance
        layer.lora_B[1].normal_()
    before = layer.lora_B[1] @ (layer.lora_A[1] * layer.lora_E[1])
    layer.grow(1)
    after = layer.lora_B[1] @ (layer.lora_A[1] * layer.lora_E[1])
    assert torch.equal(layer.lora_E[1], torch.ones_like(layer.lora_E[1])) and layer.lora_E[1].requires_grad
    assert torch.allclose(after, before, rtol=1e-6, atol=0) and before.abs().max() > 0


def test_bad_input():
    with pytest.raises(ConfigError, match="IncreLoRAConfig.init='svd' is not a way to start the components"):
        memfit.IncreLoRAConfig(init="svd")
    with pytest.raises(ConfigError, match="target_rank=1 < init_rank=4: IncreLoRA only grows ranks"):
        memfit.IncreLoRAConfig(init_rank=4, target_rank=1)
    model = memfit.inject(tiny_llama(), memfit.IncreLoRAConfig(target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"derives \['t_init', 'interval'\] from the length of the run"):
        memfit.rank_allocator(model)
    with pytest.raises(ConfigError, match="pass the optimizer|call alloc.step"):
        alloc = memfit.rank_allocator(model, total_steps=10)
        alloc.step(alloc.growth_steps()[0])


def test_importance_equals_the_papers_formula_by_autograd_on_the_composed_delta():
    """S = Σ|ΔW ⊙ ∂L/∂ΔW| / √(d_out·d_in), computed independently: the same loss on the plain base model with each
    target's weight replaced by W0 + D (D a leaf holding the adapter's ΔW), differentiated by autograd w.r.t. D."""
    model, _, _, _ = _setup()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    x = _batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    layers = dict(adapter_modules(model))
    ours = {name: float(layer.take_score()) for name, layer in layers.items()}

    reference = tiny_llama().train()
    deltas = {name: layer.delta_weight().detach().clone().requires_grad_(True) for name, layer in layers.items()}
    weights = {f"{name}.weight": reference.get_submodule(name).weight + d for name, d in deltas.items()}
    loss = torch.func.functional_call(reference, weights, args=(), kwargs={"input_ids": x, "labels": x}).loss
    grads = torch.autograd.grad(loss, list(deltas.values()))
    for (name, d), g in zip(deltas.items(), grads, strict=True):
        expected = float((d.detach() * g).abs().sum() / d.numel() ** 0.5)
        assert ours[name] == pytest.approx(expected, rel=1e-5), name
    assert len(set(round(v, 8) for v in ours.values())) == len(ours)  # modules differ: a real signal
