"""Offloaded experts give the logits of the same model fully in memory: every family, every policy, prefill and
cached decoding, batch > 1 with left padding, every checkpoint layout.

The reference is the model object that wrote the checkpoint, run by transformers with its default experts
implementation (grouped_mm): an independent code path. Error = max |ours - ref| / max |ref| <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_moe_models import CONFIGS, VOCAB, expert_keys, one_thread, save, tiny_moe  # noqa: F401 (autouse fixture)

import memfit.moe as moe

POLICIES = [("lru", None), ("lfu", None), ("score", None), ("lru", "cross-layer"), ("predictive", "cross-layer")]
TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def batch():
    """Two sequences, the second left-padded by 3 tokens."""
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@torch.no_grad()
def run(model, ids, mask, new_tokens=6):
    prefill = model(input_ids=ids, attention_mask=mask).logits
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return prefill, torch.stack(gen.logits, dim=1), gen.sequences


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(family, checkpoint dir, reference outputs)."""
    model = tiny_moe(request.param)
    path = save(model, tmp_path_factory.mktemp(request.param))
    ids, mask = batch()
    return request.param, path, run(model, ids, mask)


@pytest.mark.parametrize("policy, predictor", POLICIES, ids=[f"{p}+{q}" for p, q in POLICIES])
def test_logits_match_in_memory_model(checkpoint, policy, predictor):
    arch, path, (ref_prefill, ref_decode, ref_seq) = checkpoint
    model = moe.load(path, expert_budget="25%", policy=policy, predictor=predictor)
    try:
        prefill, decode, seq = run(model, *batch())
        stats = model.memfit_moe.stats
    finally:
        model.memfit_moe.close()
    assert rel_err(prefill, ref_prefill) <= TOL
    assert rel_err(decode, ref_decode) <= TOL  # every cached decoding step
    assert torch.equal(seq, ref_seq)
    # the budget really forced traffic: experts were read again after being evicted
    assert stats.accesses == stats.hits + stats.late + stats.misses
    assert stats.reads > model.memfit_moe.cache.slots and stats.evictions > 0


def test_bitwise_equal_to_the_eager_experts_loop(tmp_path):
    """Same ops in the same order as transformers' eager loop, whatever order the experts are read in."""
    model = tiny_moe("mixtral")
    path = save(model, tmp_path)
    model.set_experts_implementation("eager")
    ids, mask = batch()
    offloaded = moe.load(path, expert_budget="25%", policy="predictive")
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    offloaded.memfit_moe.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_sharded_and_fused_checkpoints(tmp_path, arch):
    """Shards with an expert's tensors in different files, and a checkpoint in the fused in-memory layout."""
    model = tiny_moe(arch)
    ids, mask = batch()
    ref = run(model, ids, mask)
    sharded = save(model, tmp_path / "sharded", max_shard_size="20KB")
    where = expert_keys(sharded)
    first = sorted(k for k in where if ".experts.0." in k and "layers.0." in k)
    assert len({where[k] for k in first}) > 1, "the test needs an expert split across shards"
    fused = tmp_path / "fused"
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in expert_keys(fused)
    for path in (sharded, fused):
        offloaded = moe.load(path, expert_budget="30%")
        try:
            got = run(offloaded, ids, mask)
        finally:
            offloaded.memfit_moe.close()
        assert rel_err(got[0], ref[0]) <= TOL and rel_err(got[1], ref[1]) <= TOL
        assert torch.equal(got[2], ref[2])


def test_bf16_checkpoint_computes_in_fp32(tmp_path):
    """Stored dtype != compute dtype: experts are converted while read (through a staging buffer)."""
    from transformers import AutoModelForCausalLM

    save(tiny_moe("olmoe").to(torch.bfloat16), tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = batch()
    offloaded = moe.load(tmp_path, expert_budget="25%")
    try:
        got, want = run(offloaded, ids, mask), run(ref, ids, mask)
    finally:
        offloaded.memfit_moe.close()
    assert offloaded.model.embed_tokens.weight.dtype == torch.float32
    assert rel_err(got[0], want[0]) <= TOL and rel_err(got[1], want[1]) <= TOL


def test_budget_in_bytes_and_statistics(tmp_path):
    save(tiny_moe("mixtral"), tmp_path)
    ids, mask = batch()
    probe = moe.load(tmp_path, expert_budget="100%", policy="lru", predictor=None)
    expert = probe.memfit_moe.store.expert_bytes
    assert probe.memfit_moe.cache.slots == 24  # 3 layers x 8 experts: everything fits
    with torch.no_grad():
        probe(input_ids=ids, attention_mask=mask)
        first = dict(probe.memfit_moe.stats.as_dict())
        probe.memfit_moe.reset_stats()
        probe(input_ids=ids, attention_mask=mask)
        second = probe.memfit_moe.stats
    probe.memfit_moe.close()
    assert first["bytes_read"] == first["reads"] * expert and first["misses"] == first["reads"]
    assert second.hit_ratio == 1.0 and second.bytes_read == 0  # all resident: the second pass reads nothing

    exact = moe.load(tmp_path, expert_budget=str(3 * expert + 7), policy="lru", predictor=None)
    assert exact.memfit_moe.cache.slots == 3
    assert exact.memfit_moe.memory()["expert_cache"] == 3 * expert
    exact.memfit_moe.close()


def test_an_experts_adjacent_tensors_are_read_in_one_request(tmp_path, monkeypatch):
    """Per-expert checkpoints keep an expert's three matrices side by side: one span read fills its slot."""
    from memfit.tiers.st_reader import SafetensorsReader

    model = tiny_moe("mixtral")
    ids, mask = batch()
    ref = run(model, ids, mask)
    path = save(model, tmp_path)  # one file
    spans = []
    real = SafetensorsReader.read_span
    monkeypatch.setattr(SafetensorsReader, "read_span", lambda self, infos, outs: (spans.append(len(infos)),
                                                                                   real(self, infos, outs)))
    offloaded = moe.load(path, expert_budget="25%", policy="lru", predictor=None)
    try:
        spans.clear()  # the resident weights were read tensor by tensor
        got = run(offloaded, ids, mask)
        reads = offloaded.memfit_moe.stats.reads
    finally:
        offloaded.memfit_moe.close()
    assert spans and set(spans) == {3} and len(spans) == reads  # gate, up and down in one request per expert
    assert rel_err(got[0], ref[0]) <= TOL and rel_err(got[1], ref[1]) <= TOL
