"""Chunked next-token cross-entropy (memfit.train.loss) gives the loss and gradients of the plain one."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import memfit
from memfit.train import loss as loss_mod
from memfit.train.tasks import IGNORE, CausalLM


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt
    labels[2, 7:] = IGNORE  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _losses_and_grads(monkeypatch, chunk_bytes: int, reduction: str):
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk_bytes)
    model = tiny_llama()
    memfit.inject(model, memfit.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    out = loss_mod.token_losses(model, _batch(), reduction)
    (out.sum() if reduction == "none" else out).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_chunked_loss_and_adapter_gradients_equal_the_plain_ones(monkeypatch, reduction):
    plain, plain_grads = _losses_and_grads(monkeypatch, 2**40, reduction)
    chunked, chunked_grads = _losses_and_grads(monkeypatch, 5 * 128 * 4, reduction)  # 5 positions per chunk
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys() and any("lm_head" in n for n in plain_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_task_uses_the_chunked_path_and_a_model_with_scaled_logits_keeps_the_plain_one(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 64)
    model = tiny_llama()
    calls = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        CausalLM().loss_sum(model, _batch())
    chunks = [shape[0] for shape in calls if len(shape) == 2]  # [positions, hidden]: the 8-token check is 3-D
    assert len(chunks) > 1 and sum(chunks) == int((_batch()["labels"][:, 1:] != IGNORE).sum())  # targets only
    scaled = tiny_llama()
    forward = type(scaled).forward

    def doubled(self, *args, **kwargs):  # a model that scales its logits after the head
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    monkeypatch.setattr(type(scaled), "forward", doubled)
    with torch.no_grad():
        got = CausalLM().loss_sum(scaled, _batch())
        logits = scaled(input_ids=_batch()["input_ids"], attention_mask=_batch()["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), _batch()["labels"][:, 1:].reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(got, ref)
