"""Token scheduling: batches of alike routes, signatures read no expert, outputs come back in input order."""

from __future__ import annotations

import warnings

import torch
from test_moe_models import TEXTS, VOCAB, one_thread, save, save_tokenizer, tiny_moe  # noqa: F401 (autouse fixture)
from transformers import AutoTokenizer

import memfit.moe as moe
from memfit.moe.generate import generate_requests, replay
from memfit.moe.schedule import in_order_batches, plan_batches, route_signatures


def test_plan_batches_separates_route_clusters():
    """Three clusters of routes, interleaved in the input: every planned batch is pure."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(3, 4, 16, generator=gen) < 0.25
    members = [c for _ in range(8) for c in range(3)]  # 0, 1, 2, 0, 1, 2, ...
    noise = torch.rand(len(members), 4, 16, generator=gen) < 0.03
    signatures = centres[members] ^ noise
    batches = plan_batches(signatures, 4)
    assert sorted(i for b in batches for i in b) == list(range(24))
    assert [len(b) for b in batches] == [4] * 6
    assert all(len({members[i] for i in b}) == 1 for b in batches)
    assert all(len({members[i] for i in b}) == 3 for b in in_order_batches(24, 4)[:5])
    odd = plan_batches(signatures[:10], 4)
    assert sorted(len(b) for b in odd) == [2, 4, 4]


def _distinct(signatures: torch.Tensor, batches: list[list[int]]) -> float:
    return sum(signatures[b].any(dim=0).sum().item() for b in batches) / len(batches)


def test_signatures_and_scheduled_generation(tmp_path):
    reference = tiny_moe("mixtral")
    path = save_tokenizer(save(reference, tmp_path))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [t for t in TEXTS for _ in range(2)][::-1]
    model = moe.load(path, expert_budget="40%", policy="predictive", predictor="cross-layer")
    try:
        encoded = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
        signatures = route_signatures(model, encoded)
        assert model.memfit_moe.stats.accesses == 0  # no expert was touched
        with torch.no_grad():  # the first layer's part is its exact routing
            _, _, chosen = reference.model.layers[0].mlp.gate(
                reference.model.layers[0].post_attention_layernorm(_first_residual(reference, encoded[3])))
        assert torch.equal(signatures[3, 0].nonzero().flatten(), chosen.flatten().unique())
        assert signatures[:, 1].any(dim=1).all() and not signatures[:, 2].any()  # cross-layer: one layer ahead
        batches = plan_batches(signatures, 4)
        assert _distinct(signatures, batches) <= _distinct(signatures, in_order_batches(len(prompts), 4))

        scheduled = generate_requests(model, tok, prompts, 4, 5, schedule=True)
        plain = generate_requests(model, tok, prompts, 4, 5, schedule=False)
    finally:
        model.memfit_moe.close()
    assert scheduled.batches == batches and plain.batches == in_order_batches(len(prompts), 4)
    assert scheduled.completions == plain.completions  # same text per prompt, in the input order
    with torch.no_grad():
        ids = torch.tensor([tok(prompts[5])["input_ids"]])
        alone = reference.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert plain.completions[5] == tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
    assert scheduled.new_tokens == plain.new_tokens > 0 and scheduled.distinct_experts > 0


def _first_residual(model, ids: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids.view(1, -1), use_cache=False)
    handle.remove()
    return captured[0].reshape(-1, captured[0].shape[-1])


def test_replay_decodes_through_the_kv_cache(tmp_path):
    """Teacher-forced replay (the benchmark's decoding) gives, step by step, the full-sequence logits of the
    in-memory model: the KV cache reaches the model under the forward's current keyword, without a warning."""
    reference = tiny_moe("mixtral")
    path = save(reference, tmp_path)
    ids = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    model = moe.load(path, expert_budget="40%")
    steps = []
    model.register_forward_hook(lambda module, args, out: steps.append(out.logits[0, -1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # e.g. the deprecated `past_key_values` name
            timing = replay(model, ids, prefill=4)
    finally:
        model.memfit_moe.close()
    assert (timing.new_tokens, timing.batch) == (7, 1)
    with torch.no_grad():
        expected = reference(ids).logits[0, 3:]
    torch.testing.assert_close(torch.stack(steps), expected, rtol=1e-5, atol=1e-5)
