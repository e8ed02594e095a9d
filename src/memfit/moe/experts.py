"""The module that replaces `mlp.experts`: same call, weights from the expert cache.

The arithmetic is transformers' eager experts loop, op for op (`memfit.quant.experts.expert_mlp`, which also
runs quantized experts, read from a quantized checkpoint): for expert e, the tokens routed to it (in
(top-k position, token) order), gate_up projection, act(gate) * up, down projection, times the routing
weight. Experts may be computed in any order (ready ones first, while others are read), but their
outputs are added in ascending expert order, as the eager loop adds them, so the sums round the same.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.moe.runtime import OffloadRuntime
from memfit.quant.experts import expert_mlp


class OffloadedExperts(nn.Module):
    """`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, no parameters."""

    def __init__(self, runtime: OffloadRuntime, layer: int, num_experts: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.layer, self.num_experts, self.act_fn = layer, num_experts, act_fn
        self._runtime = [runtime]  # a list: keeps the runtime out of nn.Module's registry and state_dict

    @property
    def runtime(self) -> OffloadRuntime:
        return self._runtime[0]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            # Backward would need the expert weights again, after their slots may have been reused.
            raise ConfigError("offloaded experts run inference only; call the model under torch.no_grad() "
                              "(generate does), or train with the experts in memory.")
        needed = [e for e in torch.unique(top_k_index).tolist() if e < self.num_experts]  # E marks a dropped slot
        order = self.runtime.begin(self.layer, needed)
        by_expert_k = top_k_index.T  # [k, T]: where() then yields (top-k position, token) pairs in eager order
        parts = {}
        try:
            for e in order:
                pos, tok = torch.where(by_expert_k == e)
                with self.runtime.expert(self.layer, e) as (gate_up, down):  # tensors, or quantized parts
                    y = expert_mlp(hidden_states[tok], gate_up, down, self.act_fn)
                parts[e] = (tok, y * top_k_weights[tok, pos, None])
        finally:
            self.runtime.end(self.layer, needed)
        out = torch.zeros_like(hidden_states)
        for e in needed:
            tok, y = parts[e]
            out.index_add_(0, tok, y.to(out.dtype))
        return out
