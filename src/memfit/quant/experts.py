"""Quantized Mixture-of-Experts weights: each expert's gate_up [2I, H] and down [H, I] as block-quantized weights.

transformers 5 holds a layer's experts fused (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) in a module whose
forward loops over the routed experts. `QuantExperts` replaces it with the same loop over quantized weights, one
per expert and projection (`gate_up_proj.3.codes`, ...), so a quantized checkpoint keeps every expert as its own
few tensors: what the offloaded expert store (`memfit.moe`) reads into a cache slot, bytes as stored.
`expert_mlp` is the one expert computation both run, so the offloaded and in-memory models round the same.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.quant.linear import Parts, QuantWeight, linear, linear_input_grad


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor | QuantWeight | Parts, down: torch.Tensor | QuantWeight | Parts,
               act: nn.Module) -> torch.Tensor:
    """One expert on its tokens: down(act(gate(x)) * up(x)), with gate and up fused as transformers holds them."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(act(gate) * up, down)


@torch.no_grad()
def expert_mlp_grad(x: torch.Tensor, gate_up: torch.Tensor | QuantWeight | Parts,
                    down: torch.Tensor | QuantWeight | Parts, act: nn.Module,
                    grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, d(loss)/dx) of `expert_mlp` given d(loss)/dy = `grad_y`, by hand: autograd never saves the weights,
    which may be views of a cache slot that other reads write beside them (autograd's version check would
    trip on the shared pool). Only the activation's derivative comes from autograd."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    with torch.enable_grad():
        g = gate.detach().requires_grad_(True)
        a = act(g)
    a_val = a.detach()
    y = linear(a_val * up, down)
    dh = linear_input_grad(grad_y, down)
    (dgate,) = torch.autograd.grad(a, g, dh * up)
    return y, linear_input_grad(torch.cat([dgate, dh * a_val], dim=-1), gate_up)


def fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers 5 fused experts module memfit can quantize (gated, no bias)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and not getattr(module, "has_bias", False)
            and not getattr(module, "is_transposed", False) and getattr(module, "has_gate", True)
            and getattr(module, "is_concatenated", True) and hasattr(module, "act_fn"))


class QuantExperts(nn.Module):
    """`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` over quantized experts,
    the eager loop of transformers: tokens in (top-k position, token) order, outputs added by ascending expert."""

    def __init__(self, gate_up: list[QuantWeight], down: list[QuantWeight], act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.ModuleList(gate_up), nn.ModuleList(down)
        self.num_experts, self.act_fn = len(gate_up), act_fn
        two_i, hidden = gate_up[0].shape
        self.expert_shape = (self.num_experts, hidden, two_i // 2)  # (E, H, I), as memfit.moe.arch reads it

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        by_expert_k = top_k_index.T  # [k, T]
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:  # E marks a dropped slot
                continue
            pos, tok = torch.where(by_expert_k == e)
            y = expert_mlp(hidden_states[tok], self.gate_up_proj[e], self.down_proj[e], self.act_fn)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.gate_up_proj[0].kind}"
