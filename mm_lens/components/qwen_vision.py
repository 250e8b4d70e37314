"""The Qwen2-VL / Qwen2.5-VL vision tower and patch merger, hooked as the rest of the model.

Dynamic resolution: each image keeps its own patch grid (``rows x cols`` patches of ``patch_size``
pixels, both multiples of ``spatial_merge_size``). The tower sees one image per batch row, its patches
in the processor's order: merge blocks row-major, the ``m x m`` patches of a block consecutive (so the
merger takes ``m * m`` neighbours at a time); rows of smaller images are padded at the end, and padding
is masked out of every attention. Hooks: ``vision_encoder.hook_embed`` ``[n_images, n_patches, d]`` (the
3-D convolution's patch embeddings: an image is two identical frames for the temporal kernel), then
``vision_encoder.blocks.{l}.*`` exactly as the language model's blocks (the same :class:`Block`), with
the 2-D rotary (row, column) on ``attn.hook_rot_q/k``. Qwen2.5-VL attends inside windows of
``window_size`` pixels, except in ``full_attention_layers``: the window is an attention mask here
(Hugging Face reorders the patches window by window instead; attention inside a window does not
depend on the order, so the numbers agree and the hooks keep the processor's order).

Qwen3-VL's tower adds a bias to the patch embedding and learned position embeddings: a square table of
``n_position_embeddings`` vectors, resized bilinearly (corners aligned) to each image's patch grid and added
to the patch embeddings (``vision_encoder.hook_pos_embed``, the processor's order); its blocks are LayerNorm
blocks with a plain MLP and no windows. :meth:`QwenVisionEncoder.run` also returns the hidden states after
the DeepStack layers (``deepstack_layers``).

``vision_projector`` is the :class:`PatchMerger`: ``ln_q``, then each block of ``m * m`` patches
concatenated (``hook_in`` before the norm, ``hook_hidden`` after the GELU, ``hook_out`` one vector per
merged token). Qwen3-VL's DeepStack mergers normalise after concatenating (``postshuffle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.activations import get_activation
from mm_lens.components.attention import AttentionMask
from mm_lens.components.block import Block
from mm_lens.components.norms import make_norm
from mm_lens.components.rotary import axial_rotary
from mm_lens.components.segment_attention import SegmentAttention, SegmentMask
from mm_lens.config import ProjectorConfig, VisionConfig
from mm_lens.weights import AttentionWeightsMixin

Grid = tuple[int, int]  # (rows, cols) of patches


@dataclass(frozen=True)
class QwenVisionConfig(VisionConfig):
    """A Qwen-VL vision tower. ``image_size`` is 0: every image has its own grid (dynamic resolution).

    ``window_size``: pixels per side of an attention window (Qwen2.5-VL), 0 for none;
    ``full_attention_layers``: with windows, the layers that see the whole image. Qwen3-VL:
    ``n_position_embeddings`` (a square number; 0 for none) learned positions resized to each grid,
    ``patch_bias`` (the patch embedding has a bias), ``deepstack_layers`` (the layers whose output feeds
    a DeepStack merger, in order).
    """

    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    gated_mlp: bool = False
    rope_base: float = 10000.0
    n_position_embeddings: int = 0
    patch_bias: bool = False
    deepstack_layers: tuple[int, ...] = ()

    @property
    def merge_cell(self) -> int:
        """Pixels per side of the image cell one merged (language-model) token covers."""
        return self.patch_size * self.spatial_merge_size


# ---------------------------------------------------------------- patch order and masks
def merge_order(grid: Grid, m: int) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """(row, col) of each patch in the processor's order (merge blocks row-major, ``m x m`` inside each)."""
    rows, cols = grid
    j = torch.arange(rows * cols)
    block, inside = j // (m * m), j % (m * m)
    return (block // (cols // m)) * m + inside // m, (block % (cols // m)) * m + inside % m


@dataclass
class PatchLayout:
    """Where each patch of a batch of images sits: ``rows``/``cols`` ``[n_images, n]`` (0 at padding),
    ``real`` (False at padding), ``windows`` (attention-window id, -1 at padding; None without windows)."""

    grids: list[Grid]
    rows: Int[Tensor, "n_images n"]
    cols: Int[Tensor, "n_images n"]
    real: Bool[Tensor, "n_images n"]
    windows: Optional[Int[Tensor, "n_images n"]]

    @classmethod
    def of(cls, grids: Sequence[Grid], cfg: QwenVisionConfig, device=None) -> "PatchLayout":
        m, n = cfg.spatial_merge_size, max(r * c for r, c in grids)
        rows = torch.zeros(len(grids), n, dtype=torch.long)
        cols, windows = torch.zeros_like(rows), torch.full_like(rows, -1)
        real = torch.zeros(len(grids), n, dtype=torch.bool)
        side = cfg.window_size // cfg.merge_cell  # merged tokens per window side
        for i, grid in enumerate(grids):
            r, c = merge_order(grid, m)
            k = len(r)
            rows[i, :k], cols[i, :k], real[i, :k] = r, c, True
            if side:
                per_row = -(-(grid[1] // m) // side)
                windows[i, :k] = (r // m // side) * per_row + c // m // side
        to = dict(device=device)
        return cls(list(grids), rows.to(**to), cols.to(**to), real.to(**to), windows.to(**to) if side else None)


def segment_masks(layout: PatchLayout, cfg: QwenVisionConfig) -> list[AttentionMask]:
    """Each layer's mask: the whole image (padding masked), or its windows (Qwen2.5-VL)."""
    padded = not bool(layout.real.all())
    whole = SegmentMask(False, segments=torch.where(layout.real, 0, -1)) if padded else AttentionMask(causal=False)
    if layout.windows is None:
        return [whole] * cfg.n_layers
    windowed = SegmentMask(False, segments=layout.windows)
    return [whole if l in cfg.full_attention_layers else windowed for l in range(cfg.n_layers)]


# ---------------------------------------------------------------- the tower
class QwenVisionEncoder(AttentionWeightsMixin, nn.Module):
    """Patch embedding (3-D convolution, no bias), blocks with 2-D rotary; no final norm (the merger has one)."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.W_patch = nn.Parameter(torch.empty(d, cfg.n_channels, cfg.temporal_patch_size, p, p))
        self.b_patch = nn.Parameter(torch.zeros(d)) if cfg.patch_bias else None
        self.W_pos = nn.Parameter(torch.empty(cfg.n_position_embeddings, d)) if cfg.n_position_embeddings else None
        if self.W_pos is not None and round(cfg.n_position_embeddings**0.5) ** 2 != cfg.n_position_embeddings:
            raise ValueError(f"n_position_embeddings {cfg.n_position_embeddings} must be a square (a grid of positions)")
        self.hook_embed = HookPoint()  # [n_images, n_patches, d_model]: patch embeddings, the processor's order
        # [n_images, n_patches, d_model]: learned positions resized to each grid (zero at padding); Qwen3-VL only
        self.hook_pos_embed = HookPoint() if self.W_pos is not None else None
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.d_head, cfg.d_mlp, act_fn=cfg.act_fn, gated=cfg.gated_mlp,
                  norm=cfg.normalization_type, eps=cfg.eps, use_rotary=True)
            for _ in range(cfg.n_layers)
        )
        for block in self.blocks:
            block.attn = SegmentAttention(d, cfg.n_heads, cfg.d_head, use_rotary=True)
            if cfg.gated_mlp:  # Qwen2.5-VL: gate, up and down projections all have biases
                block.mlp.b_gate = nn.Parameter(torch.zeros(cfg.d_mlp))

    def patches(self, image: Float[Tensor, "channel height width"], grid: Grid) -> Float[Tensor, "n patch_dim"]:
        """An image's patches as the processor flattens them: ``(channel, frame, row, col)``, two identical
        frames, patches in the processor's order."""
        cfg = self.cfg
        (rows, cols), m, p, c = grid, cfg.spatial_merge_size, cfg.patch_size, cfg.n_channels
        x = image[:, :rows * p, :cols * p].reshape(c, rows // m, m, p, cols // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6).reshape(rows * cols, c, 1, p, p)
        return x.expand(-1, -1, cfg.temporal_patch_size, -1, -1).reshape(rows * cols, -1)

    def embed(self, pixel_values: Float[Tensor, "n_images channel height width"], layout: PatchLayout
              ) -> Float[Tensor, "n_images n d_model"]:
        W = self.W_patch.flatten(1)
        x = pixel_values.new_zeros(len(layout.grids), layout.real.shape[1], W.shape[0], dtype=W.dtype)
        for i, grid in enumerate(layout.grids):
            x[i, :grid[0] * grid[1]] = F.linear(self.patches(pixel_values[i].to(W.dtype), grid), W, self.b_patch)
        x = self.hook_embed(x)
        return x if self.W_pos is None else x + self.hook_pos_embed(self.position_embeddings(layout).to(x.dtype))

    def position_embeddings(self, layout: PatchLayout) -> Float[Tensor, "n_images n d_model"]:
        """The learned position table resized bilinearly (corners aligned) to each image's grid, in float32, at
        each patch's (row, col); zero at padding."""
        side, d = round(self.W_pos.shape[0] ** 0.5), self.W_pos.shape[1]
        table = self.W_pos.float().T.reshape(1, d, side, side)
        out = table.new_zeros(len(layout.grids), layout.real.shape[1], d)
        for i, (rows, cols) in enumerate(layout.grids):
            grid = F.interpolate(table, size=(rows, cols), mode="bilinear", align_corners=True)[0]  # [d, rows, cols]
            k = rows * cols
            out[i, :k] = grid[:, layout.rows[i, :k], layout.cols[i, :k]].T
        return out

    def forward(self, pixel_values: Float[Tensor, "n_images channel height width"], grids: Sequence[Grid],
                stop_at_layer: Optional[int] = None) -> Float[Tensor, "n_images n d_model"]:
        """Every block (or those before ``stop_at_layer``) on images of patch grids ``grids`` ((rows, cols) each)."""
        return self.run(pixel_values, grids, stop_at_layer)[0]

    def run(self, pixel_values: Float[Tensor, "n_images channel height width"], grids: Sequence[Grid],
            stop_at_layer: Optional[int] = None) -> tuple[Float[Tensor, "n_images n d_model"], list[Tensor]]:
        """``(last hidden state, [the hidden state after each of cfg.deepstack_layers]``), as :meth:`forward`."""
        layout = PatchLayout.of(grids, self.cfg, pixel_values.device)
        x = self.embed(pixel_values, layout)
        rotary = axial_rotary(layout.rows, layout.cols, self.cfg.d_head, self.cfg.rope_base, x.dtype)
        masks = segment_masks(layout, self.cfg)
        n_run = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        kept = []
        for l, (block, mask) in enumerate(zip(self.blocks[:n_run], masks)):
            x = block(x, mask, rotary)
            if l in self.cfg.deepstack_layers:
                kept.append(x)
        return x, kept


class PatchMerger(nn.Module):
    """``ln_q``, then each merge block's ``m * m`` patches concatenated, through ``linear, GELU, linear``.
    ``postshuffle`` (Qwen3-VL's DeepStack mergers): ``ln_q`` normalises the concatenated vector instead."""

    def __init__(self, cfg: ProjectorConfig, d_vision: int, merge: int, norm: str, postshuffle: bool = False):
        super().__init__()
        self.cfg, self.merge, self.postshuffle = cfg, merge, postshuffle
        self.ln_q = make_norm(norm, cfg.d_in if postshuffle else d_vision, 1e-6)
        self.act = get_activation(cfg.act_fn)
        self.W_in = nn.Parameter(torch.empty(cfg.d_in, cfg.d_in))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_out = nn.Parameter(torch.empty(cfg.d_in, cfg.d_out))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_out))
        self.hook_in = HookPoint()  # [n_images, n_patches, d_vision]: the tower's output
        self.hook_hidden = HookPoint()  # [n_images, n_tokens, d_vision * merge**2]: after the activation
        self.hook_out = HookPoint()  # [n_images, n_tokens, d_model]: one vector per merged token

    def forward(self, x: Float[Tensor, "n_images n_patches d_vision"]) -> Float[Tensor, "n_images n_tokens d_model"]:
        x = self.hook_in(x)
        if self.postshuffle:
            x = self.ln_q(x.reshape(x.shape[0], -1, self.cfg.d_in))
        else:
            x = self.ln_q(x).reshape(x.shape[0], -1, self.cfg.d_in)
        h = self.hook_hidden(self.act(x @ self.W_in + self.b_in))
        return self.hook_out(h @ self.W_out + self.b_out)
