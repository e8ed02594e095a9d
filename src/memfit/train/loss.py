"""Next-token cross-entropy without the [tokens, vocabulary] logits tensor.

A 49k-token vocabulary at batch 4 x 128 makes 100 MB of fp32 logits, and the log-softmax and its gradient as much
again: for a small model with a large vocabulary, most of the activation peak. When the logits would pass
`CHUNK_BYTES`, the loss runs the decoder alone, keeps only the positions that have a target (prompt tokens and
padding never reach the head), and applies the output head and the cross-entropy to chunks of those positions;
under autograd each chunk is checkpointed, so its logits are freed at once and recomputed in the backward
(one more head forward per step: about 7% of a SmolLM2 step, for a peak of one chunk's logits).

That is valid only where the model's logits are exactly head(decoder(x)) (no logit scaling or soft-capping after
the head): it is checked once per model on a few tokens, and a model that differs keeps the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk
IGNORE = -100  # the label value the loss skips (padding, prompt tokens)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) if `model`'s logits are head(decoder(...).last_hidden_state), checked once on 8 tokens."""
    cached = getattr(model, "_memfit_lm_parts", None)
    if cached is not None:
        return cached or None
    get_decoder, head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", lambda: None)()
    decoder = get_decoder() if callable(get_decoder) else None
    parts: tuple | bool = False
    if decoder is not None and head is not None and decoder is not model:
        vocab = model.config.vocab_size
        ids = torch.arange(8, device=head.weight.device).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        if full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-4, atol=1e-5):
            parts = (decoder, head)
    model._memfit_lm_parts = parts
    return parts or None


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """Cross-entropy of every position t against token t+1 (IGNORE labels skipped): summed ('sum') or per
    position ([batch * (length - 1)], 0 where ignored: 'none'), chunked when the logits would be large."""
    ids, labels = batch["input_ids"], batch["labels"][:, 1:]
    vocab = model.config.vocab_size
    parts = _parts(model) if labels.numel() * vocab * 4 > CHUNK_BYTES else None
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
    rows = max(1, CHUNK_BYTES // (vocab * 4))
    losses = []
    for start in range(0, targets.numel(), rows):
        args = (head, hidden[start:start + rows], targets[start:start + rows], reduction)
        losses.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_loss(*args))
    if reduction == "sum":
        return torch.stack(losses).sum() if losses else hidden.sum() * 0
    per_token = hidden.new_zeros(flat.numel(), dtype=torch.float32)
    return per_token.index_copy(0, keep, torch.cat(losses)) if losses else per_token
