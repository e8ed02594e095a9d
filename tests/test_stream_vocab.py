"""Streamed vocabulary (`stream_weights(..., vocab=True)`, what --weights-budget training uses): embedding rows
read per lookup, the head read in vocabulary chunks by the loss. Reference: the same model in memory, the plain
cross-entropy over its full logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.errors import ConfigError
from memfit.tiers.modules import empty_weights
from memfit.tiers.stream import stream_weights
from memfit.train import loss as loss_mod
from memfit.train.loss import IGNORE, token_losses

VOCAB, HIDDEN = 300, 32


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied, pad_token_id=0)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    LlamaForCausalLM(_config(request.param)).save_pretrained(path)
    return request.param, path


def _lora(model):
    torch.manual_seed(1)
    return memfit.inject(model, memfit.LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    ids[0, 3:6] = torch.tensor([40, 41, 42])  # a run of consecutive ids: one read
    labels = ids.clone()
    labels[1, :4] = IGNORE  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _models(tied: bool, path, budget_layers: int = 2):
    ref = _lora(LlamaForCausalLM.from_pretrained(path).eval())
    with empty_weights():
        model = LlamaForCausalLM(_config(tied))
    layer = sum(p.numel() * 4 for p in ref.model.layers[0].parameters() if not p.requires_grad)
    small = sum(p.numel() * 4 for n, p in ref.named_parameters() if ".layers." not in n and "lora" not in n
                and "embed" not in n and "lm_head" not in n)
    small += sum(b.numel() * b.element_size() for b in ref.buffers())
    handle = stream_weights(model, path, small + budget_layers * layer + 64, vocab=True)
    return ref, _lora(model.eval()), handle


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_loss_and_adapter_gradients_equal_the_in_memory_model(ckpt, monkeypatch, reduction):
    tied, path = ckpt
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * 33 * 64)  # 64 vocabulary rows per chunk: 5 chunks of 300
    ref, model, handle = _models(tied, path)
    assert model.model.embed_tokens.weight.numel() == 0 and model.lm_head.weight.numel() == 0  # on disk
    assert handle.vocab.tied == tied
    batch = _batch()
    loss_mod._parts(model)  # the one-time check that logits are head(decoder(x)), before counting reads
    handle.stats.reset()
    want = token_losses(ref, batch, reduction)
    got = token_losses(model, batch, reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    forward = handle.stats.bytes_read - handle.stats.layer_reads * handle.layer_bytes[0]
    handle.stats.reset()
    (got.sum()).backward()
    (want.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    backward = handle.stats.bytes_read - handle.stats.layer_reads * handle.layer_bytes[0]
    head_bytes = VOCAB * HIDDEN * 4
    assert forward == torch.unique(batch["input_ids"]).numel() * HIDDEN * 4 + head_bytes  # its rows, the head once
    assert backward == head_bytes  # the head again, chunk by chunk; no embedding rows (no gradient there)
    handle.close()


def test_logits_generation_and_close(ckpt):
    tied, path = ckpt
    ref, model, handle = _models(tied, path)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0))
    handle.close()
    assert model.model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # the tie comes back
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_only_rows_of_the_batch_are_read(ckpt):
    tied, path = ckpt
    _, model, handle = _models(tied, path)
    ids = torch.tensor([[5, 6, 7, 200]])
    handle.stats.reset()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        rows = emb(ids)
    assert handle.stats.bytes_read == 4 * HIDDEN * 4  # four rows, in two reads
    assert rows.shape == (1, 4, HIDDEN)
    with pytest.raises(ConfigError, match="outside the embedding's 300 rows"):
        emb(torch.tensor([[VOCAB]]))
    handle.close()


def test_a_streamed_vocabulary_cannot_be_trained(ckpt):
    tied, path = ckpt
    _, model, handle = _models(tied, path)
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="input embedding is streamed from disk"):
        model(input_ids=torch.tensor([[1, 2]]))
    handle.close(materialize=False)


def test_the_vocabulary_lowers_the_smallest_budget(ckpt):
    tied, path = ckpt
    ref = LlamaForCausalLM.from_pretrained(path)
    vocab_bytes = VOCAB * HIDDEN * 4 * (1 if tied else 2)
    layer = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    total = sum(p.numel() * 4 for p in ref.parameters()) + sum(b.numel() * b.element_size() for b in ref.buffers())
    budget = total - 2 * layer - vocab_bytes + 64  # the smallest: everything but the vocabulary and 2 of 4 layers
    with empty_weights():
        model = LlamaForCausalLM(_config(tied))
    handle = stream_weights(model, path, budget, vocab=True)
    assert handle.resident_bytes + handle.window_bytes <= budget
    assert handle.streamed_bytes == 4 * layer + vocab_bytes  # every layer (two at a time) and the vocabulary
    handle.close(materialize=False)
    with empty_weights():
        model = LlamaForCausalLM(_config(tied))
    with pytest.raises(ConfigError, match="too small"):
        stream_weights(model, path, budget, vocab=False)


def test_edges_empty_lookups_bad_labels_and_a_scaled_head(ckpt, monkeypatch):
    tied, path = ckpt
    _, model, handle = _models(tied, path)
    with torch.no_grad():
        assert model.get_input_embeddings()(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, HIDDEN)
    batch = _batch()
    batch["labels"][0, 5] = VOCAB + 3  # not a token id, not the ignore value
    with pytest.raises(ConfigError, match="outside the model's 300-token vocabulary"):
        token_losses(model, batch, "sum")
    model._memfit_lm_parts = False  # as a model whose logits are scaled after the head
    with pytest.raises(ConfigError, match="raise --weights-budget to hold the head"):
        token_losses(model, _batch(), "sum")
    handle.close()


def test_a_tie_with_a_side_that_cannot_stream_keeps_both_resident(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(_config(True)).save_pretrained(tmp_path)
    with empty_weights():
        model = LlamaForCausalLM(_config(True))
    head = model.lm_head

    class Wrapped(torch.nn.Linear):  # a head of another kind: cannot stream, so its tied table stays too
        pass

    wrapped = Wrapped(HIDDEN, VOCAB, bias=False, device="meta")
    wrapped.weight = head.weight
    model.lm_head = wrapped
    handle = stream_weights(model, tmp_path, "61%", vocab=True)  # just above resident + 2 layers
    assert handle.vocab is None and model.model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    handle.close()
