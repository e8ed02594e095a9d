"""A quantized input embedding: the vocabulary table stored NF4/int8, a lookup dequantizes only its tokens' rows.

With a large vocabulary the embedding is much of a small model's frozen bytes (SmolLM2's tied 49k x 576 table is a
fifth of its parameters). `QuantEmbedding` keeps `weight` as a `QuantWeight` of shape [vocabulary, hidden]; a tied
output head is a `QuantLinear` holding the same `QuantWeight` module, so the tie survives quantization, saving and
loading, and the head's logits are the tiled quantized product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError
from memfit.quant.linear import QuantWeight


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup over a frozen quantized table (no max_norm; padding_idx only shapes gradients, and the
    table has none)."""

    def __init__(self, weight: QuantWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(input_ids, sorted=True, return_inverse=True)
        if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= self.num_embeddings):
            bad = int(unique[-1]) if int(unique[-1]) >= self.num_embeddings else int(unique[0])
            raise ConfigError(f"token id {bad} is outside the quantized embedding's {self.num_embeddings} rows; the "
                              "data was tokenized for another model.")
        rows = self.weight.parts().rows(unique.cpu()).to(input_ids.device, self.weight.dtype)
        return F.embedding(inverse, rows)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.kind}"
