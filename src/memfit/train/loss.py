"""Next-token cross-entropy without the [tokens, vocabulary] logits tensor.

A 49k-token vocabulary at batch 4 x 128 makes 100 MB of fp32 logits, and the log-softmax and its gradient as much
again: for a small model with a large vocabulary, most of the activation peak. When the logits would pass
`CHUNK_BYTES`, the loss runs the decoder alone, keeps only the positions that have a target (prompt tokens and
padding never reach the head), and applies the output head and the cross-entropy to chunks of those positions;
under autograd each chunk is checkpointed, so its logits are freed at once and recomputed in the backward
(one more head forward per step: about 7% of a SmolLM2 step, for a peak of one chunk's logits).

That is valid only where the model's logits are exactly head(decoder(x)) (no logit scaling or soft-capping after
the head): it is checked once per model on a few tokens, and a model that differs keeps the plain path.

A head streamed from disk (`--weights-budget`, `memfit.tiers.vocab`) is read in vocabulary chunks instead: the
loss of every kept position is an online log-sum-exp over the chunks, and the backward reads the chunks again
and adds each one's softmax gradient, so neither the head nor the logits ever exist whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import ConfigError
from memfit.tiers.modules import vocabulary

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk
IGNORE = -100  # the label value the loss skips (padding, prompt tokens)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) if `model`'s logits are head(decoder(...).last_hidden_state), checked once on 8 tokens."""
    cached = getattr(model, "_memfit_lm_parts", None)
    if cached is not None:
        return cached or None
    get_decoder, head = getattr(model, "get_decoder", None), vocabulary(model)[1]
    decoder = get_decoder() if callable(get_decoder) else None
    parts: tuple | bool = False
    if decoder is not None and head is not None and decoder is not model:
        vocab = model.config.vocab_size
        ids = torch.arange(8, device=head.weight.device).remainder(vocab).unsqueeze(0)
        modes = {m: m.training for m in model.modules()}
        model.eval()  # dropout would make the two passes differ
        try:
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits.float()
                mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        finally:
            for m, training in modes.items():
                m.training = training
        if full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-4, atol=1e-5):
            parts = (decoder, head)
    model._memfit_lm_parts = parts
    return parts or None


class _VocabChunkedCE(torch.autograd.Function):
    """Per-position cross-entropy [N] of hidden [N, H] against targets [N], the head's weight read by `chunks()`
    (an iterator of (first row, end row, weight rows)); gradient for `hidden` only (the head is frozen)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, chunks, bias: torch.Tensor | None):
        n = hidden.shape[0]
        top = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
        total = hidden.new_zeros(n, dtype=torch.float32)
        picked = hidden.new_zeros(n, dtype=torch.float32)
        for v0, v1, w in chunks():
            logits = _logits(hidden, w, bias, v0, v1)
            new_top = torch.maximum(top, logits.max(dim=1).values)
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(dim=1)
            top = new_top
            inside = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
            picked[inside] = logits[inside, targets[inside] - v0]
        lse = top + torch.log(total)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.chunks, ctx.bias = chunks, bias
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, targets, lse = ctx.saved_tensors
        g_hidden = torch.zeros_like(hidden, dtype=torch.float32)  # summed over chunks: in fp32, cast once
        for v0, v1, w in ctx.chunks():
            probs = torch.exp(_logits(hidden, w, ctx.bias, v0, v1) - lse[:, None])  # softmax on this chunk
            inside = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
            probs[inside, targets[inside] - v0] -= 1
            g_hidden.addmm_(probs * grad[:, None], w.float())
        return g_hidden.to(hidden.dtype), None, None, None


def _logits(hidden: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    return F.linear(hidden, w, None if bias is None else bias[v0:v1]).float()


def _streamed_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    vocab = head.memfit_vocab
    size = vocab.head_vocab()
    if int(targets.min()) < 0 or int(targets.max()) >= size:
        raise ConfigError(f"a label is outside the model's {size}-token vocabulary (labels other than {IGNORE} must be "
                          "token ids); the data was tokenized for another model.")
    # A chunk's logits stay under CHUNK_BYTES, and its weight rows under the stream's read size: both are transient.
    rows = max(1, min(CHUNK_BYTES // (4 * max(1, hidden.shape[0])), vocab.head_rows()))
    losses = _VocabChunkedCE.apply(hidden, targets, lambda: vocab.head_chunks(rows), head.bias)
    return losses.sum() if reduction == "sum" else losses


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """Cross-entropy of every position t against token t+1 (IGNORE labels skipped): summed ('sum') or per
    position ([batch * (length - 1)], 0 where ignored: 'none'), chunked when the logits would be large."""
    ids, labels = batch["input_ids"], batch["labels"][:, 1:]
    vocab = model.config.vocab_size
    head = vocabulary(model)[1]
    streamed = getattr(head, "memfit_vocab", None) is not None  # the head is on disk (weight streaming)
    parts = _parts(model) if streamed or labels.numel() * vocab * 4 > CHUNK_BYTES else None
    if parts is None and streamed:
        raise ConfigError(f"the output head of this {type(model).__name__} is streamed from disk (--weights-budget), "
                          "but its logits are not head(decoder(x)) (scaled or capped), so the loss cannot read the "
                          "head in chunks; raise --weights-budget to hold the head beside two layers.")
    if parts is None:
        # No KV cache: nothing is generated, and MeZO's paired passes call each layer twice per forward.
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        shifted = logits[:, :-1].float()  # position t predicts token t+1
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction=reduction)
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    flat = labels.reshape(-1)
    keep = (flat != IGNORE).nonzero().squeeze(1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = flat.index_select(0, keep)
    if getattr(head, "memfit_vocab", None) is not None:  # the head is on disk: chunks of the vocabulary
        losses = [_streamed_loss(head, hidden, targets, reduction)] if targets.numel() else []
    else:
        losses = _position_chunks(head, hidden, targets, reduction, max(1, CHUNK_BYTES // (vocab * 4)))
    if reduction == "sum":
        return torch.stack(losses).sum() if losses else hidden.sum() * 0
    per_token = hidden.new_zeros(flat.numel(), dtype=torch.float32)
    return per_token.index_copy(0, keep, torch.cat(losses)) if losses else per_token


def _position_chunks(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reduction: str,
                     rows: int) -> list[torch.Tensor]:
    """The loss over chunks of `rows` positions, each checkpointed (its logits freed at once, recomputed in the
    backward)."""
    losses = []
    for start in range(0, targets.numel(), rows):
        args = (head, hidden[start:start + rows], targets[start:start + rows], reduction)
        losses.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_loss(*args))
    return losses
