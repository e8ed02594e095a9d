"""Quantized frozen weights (memfit.quant) against independent references: bitsandbytes' NF4 and blockwise
(de)quantization, the dequantized fp32 model for forward, backward and QLoRA steps, PEFT for exports."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_ok, tiny_llama, write_jsonl
from safetensors.torch import load_file, save_file
from torch import nn

import memfit
from memfit import quant
from memfit.errors import CheckpointError, ConfigError
from memfit.quant import kernels
from memfit.quant.blockwise import dequantize_blocks, pack_scales, quantize_blocks, unpack_scales
from memfit.quant.checkpoint import QUANT_FILE, WEIGHTS, save_quantized
from memfit.quant.codebooks import dynamic_map, nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbf

SHAPES = [(64, 64), (33, 17), (7,), (300, 129), (1000, 65), (1, 1)]


def _weights(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_the_nf4_codebook_derived_from_the_paper_rule_is_bitsandbytes_table():
    assert torch.equal(nf4(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert nf4()[7] == 0 and nf4()[0] == -1 and nf4()[-1] == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_codes_and_dequantized_weights_equal_bitsandbytes(shape, block):
    w = _weights(shape)
    codes, absmax = quantize_blocks(w, "nf4", block)
    ref_codes, state = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    assert torch.equal(codes, ref_codes.flatten()) and torch.equal(absmax, state.absmax)
    ours = dequantize_blocks(codes, absmax, "nf4", w.shape, block)
    assert torch.equal(ours, _bnb_reference_dequant(ref_codes.flatten(), state.absmax, block, w.shape))
    if block == 64:  # bitsandbytes' CPU kernel (0.50.2) disagrees with its own reference at blocks of 128 and 256
        assert torch.equal(ours, bnbf.dequantize_4bit(ref_codes, state))


def _bnb_reference_dequant(codes, absmax, block, shape):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    return _dequantize_4bit_compute(codes, absmax, bnbf.get_4bit_type("nf4", device="cpu"), block, shape,
                                    torch.float32)


@pytest.mark.parametrize("shape", [(300, 129), (1000, 65), (2048, 64)])
def test_double_quantized_absmax_decodes_as_bitsandbytes_and_rounds_at_least_as_close(shape):
    w = _weights(shape, seed=1)
    codes, absmax = quantize_blocks(w, "nf4", 64)
    packed = pack_scales(absmax)
    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.offset, state.offset) and torch.equal(packed.scale, state.state2.absmax)
    # bitsandbytes' decode of memfit's codes gives memfit's absmax, bitwise
    ours = bnbf.QuantState(absmax=packed.codes, shape=w.shape, code=nf4(), blocksize=64, quant_type="nf4",
                           dtype=torch.float32, offset=packed.offset,
                           state2=bnbf.QuantState(absmax=packed.scale, code=dynamic_map(True), blocksize=256,
                                                  dtype=torch.float32))
    ref_codes = codes.view(-1, 1)
    assert torch.equal(bnbf.dequantize_4bit(ref_codes, ours),
                       dequantize_blocks(codes, unpack_scales(packed), "nf4", w.shape, 64))
    # memfit's codes are the nearest map entries; bitsandbytes' CPU rounding is never closer
    target = (absmax - packed.offset) / packed.scale.repeat_interleave(256)[: absmax.numel()]
    qmap = dynamic_map(True)
    assert ((qmap[packed.codes.long()] - target).abs() <= (qmap[state.absmax.long()] - target).abs()).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_is_symmetric_absmax_rounding(shape):
    w = _weights(shape, seed=2)
    codes, absmax = quantize_blocks(w, "int8", 64)
    flat = w.flatten().tolist()
    for i in range(0, len(flat), max(1, len(flat) // 97)):  # the rule, value by value, in plain Python
        a = max(abs(v) for v in flat[i // 64 * 64: i // 64 * 64 + 64])
        assert int(codes[i].view(torch.int8)) == round(flat[i] * float(torch.tensor(1 / a)) * 127)
    back = dequantize_blocks(codes, absmax, "int8", w.shape, 64)
    assert (back - w).abs().max() <= absmax.max() / 127 / 2 * 1.0001


def _quantized(out_features, in_features, kind="nf4", block=64, double_quant=True, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    quant.quantize(model, quant.QuantConfig(kind=kind, block_size=block, double_quant=double_quant, skip=[]))
    return model[0]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 40), (33, 17), (5000, 70), (64, 4096)])
def test_kernel_tiles_are_the_torch_dequantization_bitwise(kind, double_quant, shape, monkeypatch):
    layer = _quantized(*shape, kind=kind, double_quant=double_quant)
    ref = layer.weight.dequantize().reshape(-1)
    assert torch.equal(torch.cat([t.reshape(-1).clone() for *_, t in layer.weight.tiles()]), ref)
    for lib in (kernels.load(scalar=True), None):  # the plain-C build, and no compiler at all (torch ops)
        monkeypatch.setattr(kernels, "load", lambda lib=lib: lib)
        assert torch.equal(torch.cat([t.reshape(-1).clone() for *_, t in layer.weight.tiles()]), ref)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_linear_is_linear_of_the_dequantized_weight_forward_and_backward(kind):
    layer = _quantized(300, 129, kind=kind)
    w = layer.weight.dequantize()
    x = torch.randn(3, 5, 129, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_()
    y2 = F.linear(x2, w, layer.bias)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0, :1]), F.linear(x[0, :1], w, layer.bias), rtol=1e-5, atol=1e-6)


def _pair(seed=0):
    """A quantized tiny Llama and the same model with its weights dequantized into plain fp32 Linears."""
    model = quant.quantize(tiny_llama(seed))
    return model, quant.dequantize(copy.deepcopy(model))


ADAPTERS = {
    "lora": lambda: memfit.LoraConfig(r=4, target_modules="all-linear"),
    "mos": lambda: memfit.MoSConfig(r=3, r_eq=2, r_pri=1, shards=2, target_modules="all-linear"),
    "adalora": lambda: memfit.AdaLoRAConfig(init_rank=4, target_rank=2, target_modules="all-linear"),
    "increlora": lambda: memfit.IncreLoRAConfig(init_rank=1, target_rank=2, target_modules="all-linear"),
    "difffit": lambda: memfit.DiffFitConfig(),
    "compacter": lambda: memfit.CompacterConfig(n=2, reduction=4),
}


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_adapters_on_a_quantized_base_train_as_on_its_dequantized_fp32_copy(method, tokens):
    """QLoRA: three AdamW steps give the losses and adapter gradients of the same adapter on the dequantized
    weights as a frozen fp32 base."""
    runs = []
    for model in _pair():
        torch.manual_seed(1)
        memfit.inject(model, ADAPTERS[method]())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses, grads = [], []
        for _ in range(3):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in params])
            opt.step()
            opt.zero_grad()
        runs.append((torch.stack(losses), grads))
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    for step_a, step_b in zip(ga, gb, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ga[0] and any(g.abs().sum() > 0 for g in ga[0])


def test_a_quantized_weight_is_frozen_and_merging_into_it_is_refused(tokens):
    model, _ = _pair()
    weight = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ConfigError, match="frozen and cannot be trained"):
        weight.requires_grad_(True)
    memfit.inject(model, memfit.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="cannot fold an adapter into a quantized base"):
        memfit.merge(model)
    quant.dequantize(model)  # then it merges like any adapter
    before = model(tokens).logits
    memfit.merge(model)
    torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)


def test_tied_heads_and_skipped_modules_stay_full_precision():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quant.quantize(model, quant.QuantConfig(skip=[]))  # even unskipped, a tied head keeps its tie
    assert isinstance(model.lm_head.weight, nn.Parameter) and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(quant.quantize(tiny_llama()).lm_head.weight, nn.Parameter)  # an output head, by default
    model = quant.quantize(tiny_llama(), quant.QuantConfig(skip=["q_proj"]))  # skip replaces the default list
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, nn.Parameter)
    assert isinstance(model.model.layers[0].self_attn.k_proj.weight, quant.QuantWeight)
    assert isinstance(model.lm_head.weight, quant.QuantWeight)


def test_a_bf16_weight_dequantizes_to_bf16_and_moves_without_recasting_its_scales():
    layer = nn.Sequential(nn.Linear(64, 32).to(torch.bfloat16))
    quant.quantize(layer, quant.QuantConfig(skip=[]))
    assert layer[0].weight.dequantize().dtype == torch.bfloat16
    layer.to(torch.float16)  # a dtype cast of the module must not touch codes or scales
    assert layer[0].weight.absmax_scale.dtype == torch.float32 and layer[0].weight.codes.dtype == torch.uint8


def test_bad_quantization_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown quantization kind 'fp3'"):
        quant.quantize(tiny_llama(), quant.QuantConfig(kind="fp3"))
    with pytest.raises(ConfigError, match="block_size must be an even number"):
        quant.quantize(tiny_llama(), quant.QuantConfig(block_size=63))
    with pytest.raises(ConfigError, match="found no nn.Linear module to quantize"):
        quant.quantize(nn.Sequential(nn.Conv1d(3, 3, 1)))
    with pytest.raises(ConfigError, match="cannot quantize a torch.int32 weight"):
        quant.quantize_weight(torch.zeros(4, 4, dtype=torch.int32), quant.QuantConfig())
    model = tiny_llama()
    memfit.inject(model, memfit.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="quantize before injecting adapters"):
        quant.quantize(model, quant.QuantConfig(targets=["q_proj"]))


def test_a_quantized_checkpoint_loads_without_requantizing_and_gives_the_same_logits(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from memfit.local import from_pretrained

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quant.quantize(model)
    save_quantized(model, tmp_path / "q")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.model.layers[1].mlp.down_proj.weight, quant.QuantWeight)
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_a_checkpoint_that_does_not_match_its_record_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from memfit.local import from_pretrained

    save_quantized(quant.quantize(tiny_llama()), tmp_path / "q")
    meta_path = tmp_path / "q" / QUANT_FILE
    meta = json.loads(meta_path.read_text())
    name = "model.layers.0.self_attn.q_proj"
    meta["weights"][name]["shape"] = [32, 16]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        from_pretrained(AutoModelForCausalLM, tmp_path / "q")
    save_quantized(quant.quantize(tiny_llama()), tmp_path / "q")
    tensors = load_file(tmp_path / "q" / WEIGHTS)
    del tensors[name + ".weight.codes"]
    save_file(tensors, tmp_path / "q" / WEIGHTS)
    with pytest.raises(CheckpointError, match="lacks model.layers.0.self_attn.q_proj.weight.codes"):
        from_pretrained(AutoModelForCausalLM, tmp_path / "q")
    (tmp_path / "q" / WEIGHTS).write_bytes((tmp_path / "q" / WEIGHTS).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="missing or truncated"):
        from_pretrained(AutoModelForCausalLM, tmp_path / "q")


def test_quantize_finetune_export_and_merge_through_the_cli(llama_dir, tmp_path):
    """memfit quantize once; finetune on it; the PEFT export loads over the dequantized HF model with memfit's
    logits; memfit merge writes a full-precision checkpoint with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from memfit.local import from_pretrained
    from memfit.train.finetune import load_finetuned

    cli_ok("quantize", "--model", llama_dir, "--out", tmp_path / "nf4")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "puppet module for monit"}] * 16)
    cli_ok("finetune", "--model", tmp_path / "nf4", "--data", data, "--out", tmp_path / "run", "--method", "lora",
           "--no-plan", "--targets", "all-linear", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--quiet")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    run = load_finetuned(tmp_path / "run")
    assert isinstance(run.model.layers[0].self_attn.q_proj.weight, quant.QuantWeight)
    ours = run(ids).logits
    cli_ok("export", "--adapter", tmp_path / "run", "--out", tmp_path / "peft")
    base = quant.dequantize(from_pretrained(AutoModelForCausalLM, tmp_path / "nf4"))  # the base, as plain fp32
    clean = AutoModelForCausalLM.from_config(base.config)
    assert not clean.load_state_dict(base.state_dict(), strict=False).unexpected_keys
    peft = PeftModel.from_pretrained(clean, tmp_path / "peft").eval()
    torch.testing.assert_close(peft(ids).logits, ours, rtol=1e-4, atol=1e-4)
    cli_ok("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_cli_refuses_full_training_of_a_quantized_base_and_unknown_kinds(llama_dir, tmp_path):
    from test_cli_rough_edges import memfit_cli, one_error_line

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "puppet module for monit"}] * 8)
    proc = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "a", "--method", "full",
                      "--no-plan", "--quantize", "nf4", "--max-steps", "1")
    one_error_line(proc, "--method full trains the base weights, which are quantized")
    proc = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "b", "--quantize", "nf2")
    "--no-plan", one_error_line(proc, r"--quantize\) must be one of int8, nf4")
    proc = memfit_cli("generate", "--model", llama_dir, "--quantize", "nf2", "--prompt", "hi")
    one_error_line(proc, "--quantize must be one of int8, nf4")


def test_classification_with_a_quantized_encoder_keeps_the_fresh_head_trainable(bert_dir, sections, tmp_path):
    from memfit.train.config import TrainConfig
    from memfit.train.finetune import finetune, load_finetuned

    train, val = sections
    summary = finetune(bert_dir, train, tmp_path / "run", memfit.LoraConfig(r=2),
                       TrainConfig(max_steps=2, batch_size=8, quantize="int8"), eval_data=val, quiet=True)
    assert summary["trainable_params"] > 0
    model = load_finetuned(tmp_path / "run")
    assert isinstance(model.classifier.weight, nn.Parameter)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.weight, quant.QuantWeight)


def test_a_streamed_quantized_base_trains_bitwise_as_in_memory_and_reads_its_quantized_bytes(tmp_path, tokens):
    """--weights-budget on a quantized checkpoint: the same losses and adapter gradients, bit for bit, as the
    quantized model held in memory, reading codes and scales (about 0.14x the bytes of the fp32 layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from memfit.local import from_pretrained, load_config
    from memfit.quant.checkpoint import empty_quantized
    from memfit.tiers.modules import empty_weights
    from memfit.tiers.stream import stream_weights

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    fp32 = LlamaForCausalLM(config)
    fp32.save_pretrained(tmp_path / "fp32")
    save_quantized(quant.quantize(copy.deepcopy(fp32)), tmp_path / "nf4")
    memory = from_pretrained(AutoModelForCausalLM, tmp_path / "nf4")
    streamed = empty_quantized(AutoModelForCausalLM, tmp_path / "nf4", load_config(tmp_path / "nf4"))
    handle = stream_weights(streamed, tmp_path / "nf4", "60%")
    assert handle.streamed and isinstance(streamed.model.layers[0].mlp.up_proj.weight, quant.QuantWeight)
    grads = []
    for model in (memory, streamed):
        torch.manual_seed(1)
        memfit.inject(model, memfit.LoraConfig(r=4, target_modules="all-linear"))
        losses = []
        for _ in range(2):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            losses.append(loss.detach())
        grads.append((losses, [p.grad for p in model.parameters() if p.requires_grad]))
    (la, ga), (lb, gb) = grads
    assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    with empty_weights():
        skeleton = LlamaForCausalLM(config)
    fp32_stream = stream_weights(skeleton, tmp_path / "fp32", "60%")
    layers = set(handle.streamed) & set(fp32_stream.streamed)
    ratio = sum(handle.layer_bytes[i] for i in layers) / sum(fp32_stream.layer_bytes[i] for i in layers)
    assert 0.12 < ratio < 0.15  # 4.13 bits per weight, and the fp32 norms of each layer
    handle.stats.reset()
    streamed(input_ids=tokens)
    reads = handle.stats.layer_reads  # (a layer still resident from the last pass is not read again)
    assert reads and handle.stats.bytes_read == reads * handle.layer_bytes[handle.streamed[0]]  # read as stored


def test_a_quantized_load_leaves_no_page_of_the_checkpoint_mapped(llama_dir):
    """from_pretrained's fp32 tensors view the memory-mapped file; after --quantize the rest is copied out, so the
    pages quantization read leave the resident set, and the copies hold the checkpoint's values."""
    from memfit.train.finetune import load_base
    from memfit.train.tasks import TASKS

    model, _, _ = load_base(llama_dir, TASKS["causal-lm"](None), quantize="nf4")
    file = str(llama_dir / "model.safetensors")
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if file in line]
    assert mapped == []
    weights = load_file(str(llama_dir / "model.safetensors"))
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, quant.QuantLinear)
