"""Quantized MoE experts: `memfit quantize` on an MoE checkpoint writes every expert as codes and scales, and
`memfit.moe.load` keeps them quantized in its cache (byte slots, dequantized at compute). The reference is the
same quantized model fully in memory (QuantExperts, transformers' eager loop over quantized weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_moe_models import CONFIGS, one_thread, save, tiny_moe  # noqa: F401 (autouse fixture)
from test_moe_parity import TOL, batch, rel_err, run

import memfit.moe as moe
from memfit.errors import CheckpointError, ConfigError
from memfit.quant import QuantConfig, dequantize, quantize
from memfit.quant.checkpoint import QUANT_FILE, WEIGHTS, quantize_checkpoint
from memfit.quant.experts import QuantExperts


def quantized_checkpoint(tmp_path, arch: str, kind: str = "nf4"):
    """(fp32 model, quantized in-memory model, quantized checkpoint dir) of a tiny MoE."""
    model = tiny_moe(arch)
    src = save(model, tmp_path / "fp32")
    out = quantize_checkpoint(src, tmp_path / kind, QuantConfig(kind=kind))
    return model, quantize(tiny_moe(arch), QuantConfig(kind=kind)).eval(), out


@pytest.mark.parametrize("arch, kind", [(a, "nf4") for a in sorted(CONFIGS)] + [("mixtral", "int8")])
def test_offloaded_quantized_experts_give_the_in_memory_quantized_logits(tmp_path, arch, kind):
    fp32, reference, path = quantized_checkpoint(tmp_path, arch, kind)
    assert any(isinstance(m, QuantExperts) for m in reference.modules())
    ids, mask = batch()
    want = run(reference, ids, mask)
    offloaded = moe.load(path, expert_budget="25%", policy="predictive")
    try:
        got = run(offloaded, ids, mask)
        stats, runtime = offloaded.memfit_moe.stats, offloaded.memfit_moe
        assert runtime.cache.pool.dtype == torch.uint8  # the slots hold the quantized bytes, not fp32
    finally:
        offloaded.memfit_moe.close()
    assert torch.equal(got[0], want[0])  # prefill: bitwise
    assert rel_err(got[1], want[1]) <= TOL  # cached decoding steps: as the fp32 offload parity tests
    assert torch.equal(got[2], want[2])
    assert stats.reads > runtime.cache.slots and stats.evictions > 0  # the budget forced re-reads
    with torch.no_grad():  # quantization is really in effect: the fp32 model's logits differ
        assert not torch.allclose(fp32(input_ids=ids, attention_mask=mask).logits, want[0], atol=1e-4)


def test_a_budget_holds_seven_times_more_nf4_experts(tmp_path):
    _, _, path = quantized_checkpoint(tmp_path, "mixtral")
    budget = 3 * (3 * 32 * 48 * 4)  # three fp32 experts (H=32, I=48), of the model's 3 x 8
    fp32 = moe.load(tmp_path / "fp32", expert_budget=str(budget), policy="lru", predictor=None)
    nf4 = moe.load(path, expert_budget=str(budget), policy="lru", predictor=None)
    try:
        w = next(m for m in quantize(tiny_moe("mixtral"), QuantConfig()).modules() if isinstance(m, QuantExperts))
        stored = w.gate_up_proj[0].nbytes + w.down_proj[0].nbytes  # one expert's codes and scales
        expert = nf4.memfit_moe.store.expert_bytes
        assert stored <= expert < stored + 16 * 6  # six tensors, each padded to 16 bytes at most
        assert fp32.memfit_moe.cache.slots == 3
        assert nf4.memfit_moe.cache.slots == budget // expert >= 7 * 3
    finally:
        fp32.memfit_moe.close()
        nf4.memfit_moe.close()


def test_quantized_experts_round_trip_in_memory(tmp_path):
    """from_pretrained of the quantized MoE checkpoint rebuilds QuantExperts with the same logits."""
    from transformers import AutoModelForCausalLM

    from memfit.local import from_pretrained

    _, reference, path = quantized_checkpoint(tmp_path, "qwen2_moe")
    loaded = from_pretrained(AutoModelForCausalLM, path).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           reference(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ConfigError, match="quantized MoE experts"):
        dequantize(loaded)


def test_damaged_quantized_expert_checkpoints_are_clear_errors(tmp_path):
    _, _, path = quantized_checkpoint(tmp_path, "mixtral")
    with safe_open(str(path / WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = "model.layers.1.mlp.experts.down_proj.5.codes"
    assert key in tensors
    short = dict(tensors, **{key: tensors[key][:-1]})
    save_file(short, str(path / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.5.codes.*does not match"):
        moe.load(path, expert_budget="25%")
    save_file({k: v for k, v in tensors.items() if k != key}, str(path / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 'model.layers.1.mlp.experts.down_proj.5.codes'"):
        moe.load(path, expert_budget="25%")
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    meta = json.loads((path / QUANT_FILE).read_text())
    meta["experts"]["model.layers.2.mlp.experts"]["down"]["block_size"] = 32
    (path / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="quantized unlike the first MoE layer"):
        moe.load(path, expert_budget="25%")


def test_offloaded_quantized_experts_keep_the_budget_check(tmp_path):
    _, _, path = quantized_checkpoint(tmp_path, "mixtral")
    with pytest.raises(ConfigError, match="top-2 experts need at least"):
        moe.load(path, expert_budget="100")


def test_cli_quantize_then_moe_generate(tmp_path):
    """`memfit quantize` on an MoE checkpoint, then `memfit moe generate` on its output: the greedy text of the
    quantized model in memory, from a cache of 25% of the quantized experts."""
    from test_moe_cli import _run
    from test_moe_models import save_tokenizer
    from transformers import AutoTokenizer

    src = save_tokenizer(save(tiny_moe("mixtral"), tmp_path / "fp32"))
    _run("quantize", "--model", src, "--out", tmp_path / "nf4")
    out = _run("moe", "generate", "--model", tmp_path / "nf4", "--prompt", "puppet module for", "-n", "6",
               "--expert-budget", "25%")
    tok = AutoTokenizer.from_pretrained(src)
    reference = quantize(tiny_moe("mixtral"), QuantConfig()).eval()
    ids = tok("puppet module for", return_tensors="pt").input_ids
    with torch.no_grad():
        seq = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plan, text = out.splitlines()[:2]
    assert plan.startswith("6 of 24 experts cached")
    assert text == "puppet module for" + tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
