"""Rotary position embedding (the half-split convention of Llama/GPT-NeoX in Hugging Face)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class Rotary(nn.Module):
    """Holds ``inv_freq`` and turns position ids into ``(cos, sin)`` shared by every layer."""

    def __init__(self, rotary_dim: int, base: float, attention_scaling: float = 1.0):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.attention_scaling = attention_scaling
        self.register_buffer("inv_freq", self.default_inv_freq(), persistent=False)

    def default_inv_freq(self, device=None) -> Tensor:
        dims = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.base ** (dims / self.rotary_dim))

    def _apply(self, fn, recurse=True):
        """Moves follow the model; ``inv_freq`` stays float32 whatever dtype the model is cast to."""
        keep = self.inv_freq
        super()._apply(fn, recurse)
        if keep.is_meta or self.inv_freq.is_meta:  # materialised from meta: recompute
            self.inv_freq = self.default_inv_freq(device=self.inv_freq.device)
        else:
            self.inv_freq = keep.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(
        self, position_ids: Int[Tensor, "batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 rot"], Float[Tensor, "batch pos 1 rot"]]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``cos.shape[-1]`` dims of every head; the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
