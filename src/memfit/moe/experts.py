"""The module that replaces `mlp.experts`: same call, weights from the expert cache, and a backward.

The arithmetic is transformers' eager experts loop, op for op (`memfit.quant.experts.expert_mlp`, which also
runs quantized experts, read from a quantized checkpoint): for expert e, the tokens routed to it (in
(top-k position, token) order), gate_up projection, act(gate) * up, down projection, times the routing
weight. Experts may be computed in any order (ready ones first, while others are read), but their
outputs are added in ascending expert order, as the eager loop adds them, so the sums round the same.

Training (a forward whose input or routing weights need gradients) runs through `_ExpertsFn`: the forward
computes without a graph and keeps only its inputs (hidden states, routing); the backward reads each expert
it used again, from the cache (still resident from the forward, or prefetched: the runtime knows the
backward's experts from the forward's record), recomputes that expert on its tokens, and returns the input
and routing-weight gradients. This is activation checkpointing at the grain of one expert, aligned with
what is resident: the rest of the layer (attention, norms, router, shared experts) keeps its autograd graph
as usual, and no expert intermediate ([tokens, 2I] per expert, k times a dense MLP's) is held between the
passes. The expert weights get no gradient: they are frozen, and the slot they lived in may be reused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from memfit.moe.runtime import OffloadRuntime
from memfit.quant.experts import expert_mlp, expert_mlp_grad


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
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            return _ExpertsFn.apply(hidden_states, top_k_weights, top_k_index, self)
        return self.compute(hidden_states, top_k_index, top_k_weights)

    def needed(self, top_k_index: torch.Tensor) -> list[int]:
        return [e for e in torch.unique(top_k_index).tolist() if e < self.num_experts]  # E marks a dropped slot

    def routed(self, by_expert_k: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k positions, tokens) routed to expert `e`, in eager order, from top_k_index.T [k, T]."""
        return torch.where(by_expert_k == e)

    def compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                record: bool = False) -> torch.Tensor:
        needed = self.needed(top_k_index)
        order = self.runtime.begin(self.layer, needed, record=record)
        by_expert_k = top_k_index.T  # [k, T]: where() then yields (top-k position, token) pairs in eager order
        parts = {}
        try:
            for e in order:
                pos, tok = self.routed(by_expert_k, e)
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

    def backward(self, grad_out: torch.Tensor, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d hidden_states, d top_k_weights) of `compute`, each expert recomputed on its tokens."""
        needed = self.needed(top_k_index)
        order = self.runtime.begin_backward(self.layer, needed)
        by_expert_k = top_k_index.T
        grad_w = torch.zeros_like(top_k_weights)
        parts = {}
        try:
            for e in order:
                pos, tok = self.routed(by_expert_k, e)
                g = grad_out[tok]
                w = top_k_weights[tok, pos, None]  # the router's dtype, which may differ from the experts'
                grad_y = (g.to(w.dtype) * w).to(hidden_states.dtype)
                with self.runtime.expert(self.layer, e) as (gate_up, down):
                    y, dx = expert_mlp_grad(hidden_states[tok], gate_up, down, self.act_fn, grad_y)
                self.runtime.backward_done(self.layer, e)
                grad_w[tok, pos] = (g.to(y.dtype) * y).sum(dim=-1).to(grad_w.dtype)
                parts[e] = (tok, dx)
        except BaseException:
            self.runtime.abort_backward(self.layer, needed)  # the layers below will not run: forget their plan
            raise
        self.runtime.end_backward(self.layer, needed)
        grad_h = torch.zeros_like(hidden_states)
        for e in needed:  # ascending expert order, as the forward adds them
            tok, dx = parts[e]
            grad_h.index_add_(0, tok, dx.to(grad_h.dtype))
        return grad_h, grad_w


class _ExpertsFn(torch.autograd.Function):
    """The offloaded experts as one autograd node: inputs saved, experts recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, top_k_weights: torch.Tensor, top_k_index: torch.Tensor,
                module: OffloadedExperts) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(hidden_states, top_k_weights, top_k_index)
        return module.compute(hidden_states, top_k_index, top_k_weights, record=True)

    @staticmethod
    @once_differentiable  # the recomputation is not differentiable again: a double backward is an error
    def backward(ctx, grad_out: torch.Tensor):
        hidden_states, top_k_weights, top_k_index = ctx.saved_tensors
        grad_h, grad_w = ctx.module.backward(grad_out, hidden_states, top_k_index, top_k_weights)
        return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None, None,
                None)
