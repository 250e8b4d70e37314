"""The multimodal projector: vision features to language-model embeddings."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation
from mm_lens.config import ProjectorConfig


class Projector(nn.Module):
    """``mlp2x_gelu``: ``act(x W_in + b_in) W_out + b_out``; ``linear``: ``x W_in + b_in``."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        if cfg.kind not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector kind must be 'mlp2x_gelu' or 'linear', got {cfg.kind!r}")
        self.cfg = cfg
        self.W_in = nn.Parameter(torch.empty(cfg.d_in, cfg.d_out))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.kind == "mlp2x_gelu":
            self.act = get_activation(cfg.act_fn)
            self.W_out = nn.Parameter(torch.empty(cfg.d_out, cfg.d_out))
            self.b_out = nn.Parameter(torch.zeros(cfg.d_out))
        self.hook_in = HookPoint()  # [n_images, n_image_tokens, d_vision * n_feature_layers]
        self.hook_hidden = HookPoint()  # [n_images, n_image_tokens, d_model] (mlp2x_gelu only)
        self.hook_out = HookPoint()  # [n_images, n_image_tokens, d_model]

    def forward(self, x: Float[Tensor, "n_images n_tokens d_in"]) -> Float[Tensor, "n_images n_tokens d_model"]:
        x = self.hook_in(x)
        h = x @ self.W_in + self.b_in
        if self.cfg.kind == "mlp2x_gelu":
            h = self.hook_hidden(self.act(h)) @ self.W_out + self.b_out
        return self.hook_out(h)
