"""Quantized embeddings (`QuantConfig(embeddings=True)`, `memfit quantize --embeddings`): the vocabulary table in
NF4/int8, a lookup dequantizes its rows, a tied head shares the quantized weight. Reference: the same model with
the quantized weights dequantized into plain fp32 modules."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cli_ok, save_model_dir, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import memfit
from memfit import quant
from memfit.errors import ConfigError
from memfit.quant import kernels
from memfit.quant.checkpoint import empty_quantized, load_quantized, save_quantized
from memfit.quant.embedding import QuantEmbedding

VOCAB = 300


def _model(tied: bool, hidden: int = 40, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """hidden=40 with blocks of 64: rows start and end inside blocks."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))
    ids[0, :4] = torch.tensor([7, 8, 9, 10])  # a run of consecutive rows
    ids[1, 0] = VOCAB - 1
    return ids


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_lookup_dequantizes_exactly_its_rows(kind, monkeypatch):
    model = quant.quantize(_model(False), quant.QuantConfig(kind=kind, embeddings=True))
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.num_embeddings == VOCAB
    table = emb.weight.dequantize()
    ids = _ids()
    want = table[ids]
    assert torch.equal(emb(ids), want)
    assert emb(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, emb.embedding_dim)
    for lib in (kernels.load(scalar=True), None):  # the plain-C build, and no compiler (torch ops)
        monkeypatch.setattr(kernels, "load", lambda lib=lib: lib)
        assert torch.equal(emb(ids), want)
    with pytest.raises(ConfigError, match="token id 300 is outside the quantized embedding's 300 rows"):
        emb(torch.tensor([[VOCAB]]))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_lora_steps_checkpoint_and_dequantize_keep_the_tie(tied, tmp_path):
    model = quant.quantize(_model(tied), quant.QuantConfig(embeddings=True))
    assert isinstance(model.lm_head, quant.QuantLinear)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # one quantized table when tied
    dense = quant.dequantize(copy.deepcopy(model))
    assert type(dense.model.embed_tokens) is torch.nn.Embedding
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) == tied
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    save_quantized(model, tmp_path / "q")
    loaded, info = load_quantized(AutoModelForCausalLM, tmp_path / "q", model.config)
    assert info["missing_keys"] == [] and (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)

    runs = []  # LoRA on the quantized base trains as on its dequantized copy
    for m in (loaded, dense):
        torch.manual_seed(1)
        memfit.inject(m, memfit.LoraConfig(r=4, target_modules="all-linear"))
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=0)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_quantized_embeddings_cut_the_frozen_bytes_and_stay_resident_when_streaming(tmp_path):
    from memfit.local import load_config
    from memfit.tiers.stream import stream_weights

    fp32 = _model(True, hidden=64, layers=4)
    linears = quant.quantize(copy.deepcopy(fp32))
    everything = quant.quantize(copy.deepcopy(fp32), quant.QuantConfig(embeddings=True))

    def frozen(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    assert frozen(everything) < frozen(linears) - 0.8 * VOCAB * 64 * 4  # the table now takes ~0.13x
    save_quantized(everything, tmp_path / "q")
    streamed = empty_quantized(AutoModelForCausalLM, tmp_path / "q", load_config(tmp_path / "q"))
    handle = stream_weights(streamed, tmp_path / "q", "60%")
    assert handle.streamed and isinstance(streamed.model.embed_tokens, QuantEmbedding)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, everything(input_ids=ids).logits)
    handle.close()


def test_embeddings_of_another_kind_are_a_clear_error():
    model = _model(False)
    model.model.embed_tokens = torch.nn.Embedding(VOCAB, 40, max_norm=1.0)
    with pytest.raises(ConfigError, match="not a plain nn.Embedding"):
        quant.quantize(model, quant.QuantConfig(embeddings=True))


def test_cli_quantize_embeddings_then_finetune_and_merge(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    src = save_model_dir(LlamaForCausalLM(config), tmp_path / "fp32")
    cli_ok("quantize", "--model", src, "--out", tmp_path / "nf4", "--embeddings")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "puppet module for monit"}] * 8)
    cli_ok("finetune", "--model", tmp_path / "nf4", "--data", data, "--out", tmp_path / "run", "--method", "lora",
           "--no-plan", "--max-steps", "2", "--batch-size", "4", "--quiet")
    cli_ok("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.embed_tokens) is torch.nn.Embedding
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_a_checkpoint_missing_its_quantized_table_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from memfit.errors import CheckpointError
    from memfit.quant.checkpoint import WEIGHTS

    model = quant.quantize(_model(False), quant.QuantConfig(embeddings=True))
    save_quantized(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.embed_tokens.weight.codes"}  # noqa: SIM118
    save_file(kept, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks model.embed_tokens.weight.codes"):
        load_quantized(AutoModelForCausalLM, tmp_path, model.config)
