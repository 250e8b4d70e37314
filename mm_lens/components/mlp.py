"""MLP (plain or gated) with TransformerLens hooks and weight names."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation
from mm_lens.memory import pooled_empty


class MLP(nn.Module):
    """``out = act(x W_in + b_in) W_out + b_out``; gated: ``act(x W_gate) * (x W_in + b_in)``."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool):
        super().__init__()
        self.gated = gated
        self.act = get_activation(act_fn)
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp)) if gated else None
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp] (gated only)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = x.flatten(0, -2)
        shape = (*x.shape[:-1], self.W_in.shape[1])

        def out(hook: HookPoint, *inputs: Tensor, flat_out: bool = True) -> Optional[Tensor]:
            """A reusable buffer when ``hook`` may cache the result (see mm_lens.memory)."""
            buffer = pooled_empty(shape, x.dtype, x.device, hook, *inputs)
            return buffer.view(flat.shape[0], shape[-1]) if buffer is not None and flat_out else buffer

        if self.gated:
            pre = torch.mm(flat, self.W_gate, out=out(self.hook_pre, flat, self.W_gate))
            pre = self.hook_pre(pre.view(shape))
            linear = torch.addmm(self.b_in, flat, self.W_in, out=out(self.hook_pre_linear, flat, self.W_in, self.b_in))
            linear = self.hook_pre_linear(linear.view(shape))
            post = torch.mul(self.act(pre), linear, out=out(self.hook_post, pre, linear, flat_out=False))
        else:
            pre = torch.addmm(self.b_in, flat, self.W_in, out=out(self.hook_pre, flat, self.W_in, self.b_in))
            pre = self.hook_pre(pre.view(shape))
            post = self.act(pre, out=out(self.hook_post, pre, flat_out=False))
        post = self.hook_post(post)
        result = torch.addmm(self.b_out, post.flatten(0, -2), self.W_out)
        return result.view(*x.shape[:-1], -1)
