"""The pixel-shuffle connectors of Idefics3 / SmolVLM and InternVL: each ``s x s`` block of a crop's patch grid
becomes one token (the block's ``s * s`` patch vectors concatenated), then a projection to the language model.

* Idefics3 / SmolVLM (``kind="pixel_shuffle"``): ``shuffle(x) W_in`` (no bias; Hugging Face's
  ``connector.modality_projection.proj``).
* InternVL (``kind="pixel_shuffle_mlp"``): ``act(ln(shuffle(x)) W_in + b_in) W_out + b_out`` (``multi_modal_projector``:
  LayerNorm, linear, GELU, linear).

Both Hugging Face implementations order a token's ``s * s * d`` features the same way: patch rows of the block
outer, patch columns inner, channels last; tokens row-major over the ``side / s`` grid (tested against both).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation
from mm_lens.components.norms import make_norm
from mm_lens.config import ProjectorConfig

KINDS = ("pixel_shuffle", "pixel_shuffle_mlp")


def pixel_shuffle(x: Float[Tensor, "n_crops n_patches d"], scale: int) -> Float[Tensor, "n_crops n_tokens d_shuffled"]:
    """Token (i, j) of each crop = patches (i*s + a, j*s + b) for a, b in 0..s-1 (a outer), concatenated."""
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p or side % scale:
        raise ValueError(f"pixel shuffle needs a square patch grid whose side is a multiple of {scale}, got {p} patches")
    k = side // scale
    return x.reshape(n, k, scale, k, scale, d).permute(0, 1, 3, 2, 4, 5).reshape(n, k * k, scale * scale * d)


class PixelShuffleProjector(nn.Module):
    """``vision_projector`` of the pixel-shuffle families (module docstring). ``cfg.d_in`` is ``d_vision * scale**2``."""

    def __init__(self, cfg: ProjectorConfig, scale: int):
        super().__init__()
        if cfg.kind not in KINDS:
            raise ValueError(f"pixel-shuffle projector kind must be one of {KINDS}, got {cfg.kind!r}")
        self.cfg, self.scale = cfg, scale
        mlp = cfg.kind == "pixel_shuffle_mlp"
        self.ln = make_norm("LN", cfg.d_in, cfg.eps) if mlp else None
        self.W_in = nn.Parameter(torch.empty(cfg.d_in, cfg.d_out))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_out)) if cfg.bias else None
        if mlp:
            self.act = get_activation(cfg.act_fn)
            self.W_out = nn.Parameter(torch.empty(cfg.d_out, cfg.d_out))
            self.b_out = nn.Parameter(torch.zeros(cfg.d_out))
        self.hook_in = HookPoint()  # [n_crops, n_patches, d_vision]: the tower's output, class token dropped
        self.hook_shuffled = HookPoint()  # [n_crops, n_tokens, d_vision * scale**2]
        self.hook_hidden = HookPoint()  # [n_crops, n_tokens, d_model]: after the activation (InternVL only)
        self.hook_out = HookPoint()  # [n_crops, n_tokens, d_model]: one vector per image token

    def forward(self, x: Float[Tensor, "n_crops n_patches d_vision"]) -> Float[Tensor, "n_crops n_tokens d_model"]:
        x = self.hook_shuffled(pixel_shuffle(self.hook_in(x), self.scale))
        if self.ln is not None:
            x = self.ln(x)
        h = x @ self.W_in
        if self.b_in is not None:
            h = h + self.b_in
        if self.cfg.kind == "pixel_shuffle_mlp":
            h = self.hook_hidden(self.act(h)) @ self.W_out + self.b_out
        return self.hook_out(h)
