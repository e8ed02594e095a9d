"""AdaLoRA against PEFT's AdaLoRA (same weights, batches, hyperparameters), export, schedule and bad input."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama

import memfit
from memfit.adapters.model import adapter_modules
from memfit.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "up_proj"]
SCHEDULE = {"init_rank": 6, "target_rank": 2, "t_init": 10, "t_final": 20, "interval": 5}
TOTAL = 70


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 12), generator=gen) for _ in range(n)]


def _peft_twin(model: torch.nn.Module, config: memfit.AdaLoRAConfig) -> peft.PeftModel:
    """PEFT's AdaLoRA on the same base, carrying memfit's initial A, E, B."""
    ref = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=config.init_rank, target_r=config.target_rank, tinit=config.t_init,
        tfinal=config.t_final, deltaT=config.interval, total_step=TOTAL, lora_alpha=config.alpha, lora_dropout=0.0,
        beta1=config.beta1, beta2=config.beta2, orth_reg_weight=config.orth_reg_weight, target_modules=TARGETS))
    with torch.no_grad():
        for name, layer in adapter_modules(model):
            twin = ref.base_model.model.get_submodule(name)
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(twin, part)["default"].copy_(getattr(layer, part))
    return ref


def _record_peft_masks(ref: peft.PeftModel) -> dict[int, dict[str, int]]:
    """Spy on PEFT's mask_to_budget: {step: {module: rank}} at every mask event."""
    allocator, events = ref.base_model.rankallocator, {}
    original = allocator.mask_to_budget

    def spy(model, budget):
        pattern = original(model, budget)
        events[ref.base_model._memfit_step] = {k.removesuffix(".lora_E.default"): sum(v) for k, v in pattern.items()}
        return pattern

    allocator.mask_to_budget = spy
    return events


def test_matches_peft_adalora_rank_patterns_and_losses():
    config = memfit.AdaLoRAConfig(target_modules=TARGETS, alpha=8.0, **SCHEDULE)
    torch.manual_seed(0)
    model = memfit.inject(tiny_llama(), config)
    ref = _peft_twin(model, config)
    peft_events = _record_peft_masks(ref)
    alloc = memfit.rank_allocator(model, total_steps=TOTAL)
    ours_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=2e-2)
    ours_events, worst = {}, 0.0
    model.train()
    ref.train()
    for step, x in enumerate(_batches(TOTAL), start=1):
        loss = model(input_ids=x, labels=x).loss + alloc.regularization()
        loss.backward()
        ours_opt.step()
        event = alloc.step(step, ours_opt)
        ours_opt.zero_grad()
        if event is not None:
            ours_events[step] = event["ranks"]

        ref_loss = ref(input_ids=x, labels=x).loss  # PEFT adds the orthogonality term inside its forward
        ref_loss.backward()
        ref_opt.step()
        ref.base_model._memfit_step = step
        ref.base_model.update_and_allocate(step)
        ref_opt.zero_grad()
        worst = max(worst, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))

    assert sorted(ours_events) == sorted(peft_events) == [15, 20, 25, 30, 35, 40, 45, 50]
    for step in ours_events:
        assert ours_events[step] == peft_events[step], f"rank pattern differs at step {step}"
    totals = [sum(r.values()) for r in ours_events.values()]
    assert totals[0] < 6 * 6 and totals[-1] == 2 * 6 and totals == sorted(totals, reverse=True)
    assert len(set(ours_events[50].values())) > 1  # the budget really moved between modules
    assert worst <= 1e-6, f"loss relative difference {worst:.2e}"


def test_budget_schedule_is_cubic_between_t_init_and_t_final():
    model = memfit.inject(tiny_llama(), memfit.AdaLoRAConfig(target_modules=["q_proj"], **SCHEDULE))
    alloc = memfit.rank_allocator(model, total_steps=TOTAL)
    b0, bt = 12, 4  # 2 modules × init 6 / target 2
    assert alloc.budget(10) == (b0, False)
    assert alloc.budget(15) == (int((b0 - bt) * (1 - 5 / 40) ** 3 + bt), True)
    assert alloc.budget(16)[1] is False
    assert alloc.budget(51) == (bt, True)


def test_final_phase_keeps_masked_triplets_at_zero_and_export_is_exact(tmp_path):
    config = memfit.AdaLoRAConfig(target_modules=TARGETS, init_rank=6, target_rank=2, t_init=2, t_final=10, interval=2)
    torch.manual_seed(0)
    model = memfit.inject(tiny_llama(), config).train()
    alloc = memfit.rank_allocator(model, total_steps=30)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step, x in enumerate(_batches(30), start=1):
        (model(input_ids=x, labels=x).loss + alloc.regularization()).backward()
        opt.step()
        alloc.step(step, opt)
        opt.zero_grad()
    for name, layer in adapter_modules(model):
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0), name
        assert layer.lora_factors()[0].shape[0] == layer.rank
    assert sum(alloc.ranks().values()) == 2 * 6

    # a module the allocator gave rank 0 is left out of the export
    dead = "model.layers.1.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(dead).lora_E.zero_()
        model.get_submodule(dead).rank_mask.zero_()
    memfit.export_peft(model, tmp_path)
    exported = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model.eval()(x).logits
        assert torch.allclose(exported(x).logits, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tiny_llama()(x).logits, expected, atol=1e-4)  # the adapter does something
    cfg_json = (tmp_path / "adapter_config.json").read_text()
    assert dead not in cfg_json and "rank_pattern" in cfg_json
    peft_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in exported.named_modules()
                  if hasattr(m, "r") and isinstance(m.r, dict) and "default" in m.r}
    assert dead not in peft_ranks
    assert peft_ranks == {n: r for n, r in alloc.ranks().items() if r > 0}


def test_export_names_modules_when_a_kind_name_is_shared_with_unadapted_ones(tmp_path):
    # BERT's pooler is a "dense" too: exporting target_modules=["dense"] would make PEFT adapt it as well
    config = memfit.AdaLoRAConfig(target_modules=r".*layer\.\d+\.(intermediate|output)\.dense", init_rank=2,
                                  target_rank=1, modules_to_save=["classifier"])
    model = memfit.inject(tiny_bert(), config).eval()
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            layer.lora_E.normal_()
    memfit.export_peft(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(model.memfit_targets) and "bert.pooler.dense" not in adapted
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)


def test_lora_init_starts_like_lora_and_moves_delta_w_from_the_first_update(tmp_path):
    """init="lora": B = 0, A Kaiming-uniform, E = 1, so ΔW = 0 and B takes the whole gradient at once. From the
    paper's start (E = 0, A, B ~ N(0, 0.02)) the first update moves ΔW only by E's step times two small factors:
    one Adam step each on the same batch, and the first ΔW is many times the second (~270× here). Saved and
    loaded, the adapter keeps its weights and its config."""
    moved = {}
    for init in ("lora", "gaussian"):
        torch.manual_seed(0)
        config = memfit.AdaLoRAConfig(target_modules=TARGETS, init_rank=2, target_rank=2, init=init)
        model = memfit.inject(tiny_llama(), config).train()
        layers = [layer for _, layer in adapter_modules(model)]
        for layer in layers:
            assert not layer.delta_weight().any()
            if init == "lora":
                bound = layer.in_features ** -0.5  # kaiming_uniform_(a=√5), as LoRA's A
                assert not layer.lora_B.any() and torch.equal(layer.lora_E, torch.ones_like(layer.lora_E))
                assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.5 * bound
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x = _batches(1)[0]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        moved[init] = sum(layer.delta_weight().norm().item() for layer in layers)
    assert moved["lora"] > 20 * moved["gaussian"] > 0

    torch.manual_seed(1)
    started = memfit.inject(tiny_llama(), memfit.AdaLoRAConfig(target_modules=TARGETS, init="lora")).eval()
    memfit.save_adapter(started, tmp_path)
    loaded = memfit.load_adapter(tiny_llama(), tmp_path).eval()
    assert loaded.memfit_config.init == "lora"
    for name, layer in adapter_modules(started):
        assert torch.equal(loaded.get_submodule(name).lora_A, layer.lora_A)


def test_bad_input():
    with pytest.raises(ConfigError, match="AdaLoRAConfig.init='zeros' is not a way to start the components"):
        memfit.AdaLoRAConfig(init="zeros")
    with pytest.raises(ConfigError, match=r"t_init \(40\) \+ t_final \(30\) >= total steps \(70\)"):
        memfit.rank_allocator(memfit.inject(tiny_llama(), memfit.AdaLoRAConfig(target_modules=["q_proj"], t_init=40,
                                                                               t_final=30)), total_steps=70)
    with pytest.raises(ConfigError, match="needs the length of the run"):
        memfit.rank_allocator(memfit.inject(tiny_llama(), memfit.AdaLoRAConfig(target_modules=["q_proj"])))
    with pytest.raises(ConfigError, match="target_rank=9 > init_rank=4"):
        memfit.AdaLoRAConfig(init_rank=4, target_rank=9)
    with pytest.raises(ConfigError, match=r"beta1 must be in \(0, 1\)"):
        memfit.AdaLoRAConfig(beta1=1.0)
