"""A hooked ViT vision tower (CLIP-style), with the language model's hook names.

``vision_encoder.hook_embed`` (patch embeddings, class token first),
``hook_pos_embed``, ``ln_pre``, ``blocks.{l}.*`` exactly as in the language model,
``ln_post``. ``blocks.{l}.hook_resid_pre`` is Hugging Face's ``hidden_states[l]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.attention import AttentionMask
from mm_lens.components.block import Block
from mm_lens.components.norms import make_norm
from mm_lens.config import VisionConfig
from mm_lens.weights import AttentionWeightsMixin


class VisionEncoder(AttentionWeightsMixin, nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.W_patch = nn.Parameter(torch.empty(d, cfg.n_channels, cfg.patch_size, cfg.patch_size))
        self.b_patch = nn.Parameter(torch.zeros(d)) if cfg.patch_bias else None
        self.cls_token = nn.Parameter(torch.empty(d)) if cfg.has_cls_token else None
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, d))
        self.hook_embed = HookPoint()  # [batch, n_ctx, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, n_ctx, d_model]
        self.ln_pre = make_norm(cfg.normalization_type, d, cfg.eps) if cfg.has_ln_pre else None
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.d_head, cfg.d_mlp, act_fn=cfg.act_fn, gated=False,
                  norm=cfg.normalization_type, eps=cfg.eps, use_rotary=False)
            for _ in range(cfg.n_layers)
        )
        self.ln_post = make_norm(cfg.normalization_type, d, cfg.eps) if cfg.has_ln_post else None

    def check_pixels(self, pixel_values: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.n_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [n_images, {', '.join(map(str, expected))}] for this "
                f"vision tower, got {tuple(pixel_values.shape)}; pass PIL images or paths to "
                "model.to_inputs so the processor resizes them, or resize the tensor yourself"
            )

    def embed(self, pixel_values: Float[Tensor, "n_images channel height width"]) -> Float[Tensor, "n_images n_ctx d_model"]:
        self.check_pixels(pixel_values)
        patches = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=self.cfg.patch_size)
        x = patches.flatten(2).transpose(1, 2)  # [n_images, n_patches, d_model]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.hook_embed(x)
        pos = self.hook_pos_embed(self.W_pos.expand(x.shape[0], -1, -1))
        x = x + pos
        return self.ln_pre(x) if self.ln_pre is not None else x

    def forward(
        self,
        pixel_values: Float[Tensor, "n_images channel height width"],
        stop_at_layer: Optional[int] = None,
    ) -> Float[Tensor, "n_images n_ctx d_model"]:
        """Run the tower; with ``stop_at_layer=l`` return ``blocks.{l}.hook_resid_pre`` (HF ``hidden_states[l]``).

        Without ``stop_at_layer`` every block runs and ``ln_post`` is applied.
        """
        x = self.embed(pixel_values)
        mask = AttentionMask(causal=False)
        n_run = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        for block in self.blocks[:n_run]:
            x = block(x, mask)
        if stop_at_layer is None and self.ln_post is not None:
            x = self.ln_post(x)
        return x

    def hidden_states(
        self, pixel_values: Tensor, layers: Sequence[int]
    ) -> list[Float[Tensor, "n_images n_ctx d_model"]]:
        """Hugging Face's ``hidden_states[l]`` for each ``l`` (negative counts from the end), running only
        the blocks they need."""
        n = self.cfg.n_layers
        wanted = [l % (n + 1) for l in layers]
        x = self.embed(pixel_values)
        mask = AttentionMask(causal=False)
        out: dict[int, Tensor] = {0: x}
        for l in range(max(wanted)):
            x = self.blocks[l](x, mask)
            out[l + 1] = x
        return [out[l] for l in wanted]
