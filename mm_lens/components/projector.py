"""The multimodal projector: vision features to language-model embeddings.

:class:`Projector`: LLaVA's (``mlp2x_gelu`` or ``linear``). :class:`PooledProjector`: Gemma 3's (the patch grid
average-pooled to a few soft tokens, RMSNorm, a linear map). :func:`make_projector` picks one by ``cfg.kind``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation
from mm_lens.components.norms import make_norm
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


class PooledProjector(nn.Module):
    """Gemma 3: ``norm(avg_pool(x)) W_in`` (no bias). The ``g x g`` patch grid of each image is average-pooled
    to ``tokens_per_side x tokens_per_side`` soft tokens (kernel = stride = ``g // tokens_per_side``), then
    RMS-normalised (``norm``, its weight stored as Gemma's ``1 + w``) and projected to ``d_model``."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = make_norm("RMS", cfg.d_in, cfg.eps)
        self.W_in = nn.Parameter(torch.empty(cfg.d_in, cfg.d_out))
        self.hook_in = HookPoint()  # [n_images, g * g, d_vision]: the vision tower's output
        self.hook_pooled = HookPoint()  # [n_images, tokens_per_side ** 2, d_vision]
        self.hook_out = HookPoint()  # [n_images, tokens_per_side ** 2, d_model]

    def forward(self, x: Float[Tensor, "n_images n_patches d_in"]) -> Float[Tensor, "n_images n_tokens d_model"]:
        x = self.hook_in(x)
        n, n_patches, d = x.shape
        g, t = int(round(n_patches**0.5)), self.cfg.tokens_per_side
        if g * g != n_patches or g % t:
            raise ValueError(f"{n_patches} patches per image do not pool to a {t}x{t} grid of soft tokens")
        grid = x.transpose(1, 2).reshape(n, d, g, g)
        pooled = self.hook_pooled(F.avg_pool2d(grid, kernel_size=g // t).flatten(2).transpose(1, 2))
        return self.hook_out(self.norm(pooled) @ self.W_in)


def make_projector(cfg: ProjectorConfig) -> nn.Module:
    return PooledProjector(cfg) if cfg.kind == "pooled" else Projector(cfg)
