"""MLP (plain or gated) with TransformerLens hooks and weight names."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation


class MLP(nn.Module):
    """``out = act(x W_in + b_in) W_out + b_out``; gated: ``act(x W_gate) * (x W_in + b_in)``.

    ``b_gate`` is None (TransformerLens' gated MLP has none) unless a tower's gate has a bias (the Qwen2.5-VL
    vision tower sets it to a parameter): then ``act(x W_gate + b_gate)``.
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool):
        super().__init__()
        self.gated = gated
        self.act = get_activation(act_fn)
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp)) if gated else None
        self.register_parameter("b_gate", None)  # [d_mlp] when the checkpoint has one
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp] (gated only)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = x.flatten(0, -2)
        shape = (*x.shape[:-1], self.W_in.shape[1])
        if self.gated:
            gate = flat @ self.W_gate if self.b_gate is None else torch.addmm(self.b_gate, flat, self.W_gate)
            pre = self.hook_pre(gate.view(shape))
            linear = self.hook_pre_linear(torch.addmm(self.b_in, flat, self.W_in).view(shape))
            post = self.act(pre) * linear
        else:
            pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).view(shape))
            post = self.act(pre)
        post = self.hook_post(post)
        result = torch.addmm(self.b_out, post.flatten(0, -2), self.W_out)
        return result.view(*x.shape[:-1], -1)
