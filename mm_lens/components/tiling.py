"""Where each crop's features go among an image's positions: the layout of a tiled or cropped image.

* LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision tile an image: it is resized to the best of
  ``image_grid_pinpoints`` and cut into tiles of the tower's input size; a downscaled copy (the *base* image)
  goes first. Every crop runs through the vision tower and the projector. The tiles' patch grids are
  stitched into one map, the rows/columns that only cover padding are dropped (*unpadding*); OneVision
  (``anyres_max_N``) then shrinks a map of more than about N tiles' worth of patches by bilinear
  interpolation; after each row of the map comes the learned ``image_newline`` vector::

      base patches (g*g) | map row 0 ... newline | map row 1 ... newline | ...

  OneVision's multi-image mode (several images in one prompt, as its processor does it) does not tile: an
  image there is its base grid followed by one newline (:func:`single_layout`).
* Gemma 3's pan-and-scan adds crops of a wide or tall image after its thumbnail; each crop is a full image of
  soft tokens of its own (no stitching, no newline), between its own start/end markers (:func:`crops_layout`).

:class:`AnyresLayout` says, for one image, where its base grid, each tile, the stitched map and the newlines
sit among that image's positions; it arranges per-crop vectors in that order and finds the positions a box
touches. The pipelines that use it: :mod:`mm_lens.components.anyres`, :mod:`mm_lens.components.pan_and_scan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


# ---------------------------------------------------------------- one image's layout
@dataclass
class AnyresLayout:
    """Where everything of one image sits among its feature positions (offsets into that image's positions).

    ``base [t, t]``: the base image (Gemma 3: the thumbnail). ``tiles[(tr, tc)]``: each tile's (or crop's)
    kept cells as a grid; ``tile_grid``: (tile rows, tile cols). ``map_positions [rows, cols]``: the stitched,
    unpadded (and possibly reduced) tile map; ``newlines [rows]``: the newline after each of its rows.
    For packing: ``map_index [rows0, cols0]`` indexes the flattened ``[n_crops, g*g]`` crop features of the
    unpadded map, which is interpolated to ``reduced`` (rows, cols) when OneVision shrinks it. ``pool``: patches
    per soft token along a side (Gemma 3's average pooling; 1 otherwise).
    """

    n_tokens: int
    n_crops: int
    patch_grid: int
    base: Int[Tensor, "t t"]
    tile_grid: tuple[int, int] = (0, 0)
    tiles: dict = field(default_factory=dict)
    map_positions: Optional[Int[Tensor, "rows cols"]] = None
    newlines: Int[Tensor, " n_newlines"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    map_index: Optional[Int[Tensor, "rows0 cols0"]] = None
    reduced: Optional[tuple[int, int]] = None
    pool: int = 1
    alone: bool = True  # processed as the only image of its prompt (False: OneVision's multi-image mode)
    processor_kwargs: dict = field(default_factory=dict)  # what the processor was called with (e.g. pan-and-scan)

    @property
    def newline_mask(self) -> Bool[Tensor, " n_tokens"]:
        mask = torch.zeros(self.n_tokens, dtype=torch.bool)
        mask[self.newlines] = True
        return mask

    def arrange(self, features: Float[Tensor, "n_crops g2 d"], newline: Float[Tensor, " d"]
                ) -> Float[Tensor, "n_tokens d"]:
        """This image's crop features (of any width ``d``) in packed order, ``newline`` at the newline positions."""
        d = features.shape[-1]
        base = features[0]
        newline = newline.to(features.dtype)[None]
        if self.map_index is None:
            return torch.cat([base, newline]) if len(self.newlines) else base
        grid = features.flatten(0, 1)[self.map_index.to(features.device)]  # [rows0, cols0, d]
        if self.reduced is not None:  # OneVision anyres_max: bilinear, channels first as Hugging Face runs it
            grid = F.interpolate(grid.permute(2, 0, 1)[None], list(self.reduced), mode="bilinear")[0].permute(1, 2, 0)
        rows = torch.cat([grid, newline.expand(grid.shape[0], 1, d)], dim=1)
        return torch.cat([base, rows.flatten(0, 1)])

    def touched(self, masks: Bool[Tensor, "n_crops g g"]) -> Bool[Tensor, " n_tokens"]:
        """Which positions read a patch that ``masks`` marks (per crop the processor made, patch-level): a
        pooled or interpolated token counts if any patch it reads is marked; newlines never count."""
        n, g, _ = masks.shape
        t = g // self.pool
        cells = masks.view(n, t, self.pool, t, self.pool).any(4).any(2)  # [n_crops, t, t]
        out = torch.zeros(self.n_tokens, dtype=torch.bool)
        out[self.base.flatten()] = cells[0].flatten()
        if self.map_index is None:
            for k, grid in enumerate(self.tiles.values()):  # crops in processor order
                out[grid.flatten()] = cells[1 + k].flatten()
            return out
        stitched = cells.flatten()[self.map_index]
        if self.reduced is not None:  # a reduced cell reads every patch with a non-zero bilinear weight
            stitched = F.interpolate(stitched.float()[None, None], list(self.reduced), mode="bilinear")[0, 0] > 0
        out[self.map_positions.flatten()] = stitched.flatten()
        return out


def best_resolution(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps most of the image's resolution with least waste."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(list(image_hw), [list(p) for p in pinpoints]))


def unpadded_span(original_hw: tuple[int, int], current_hw: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the stitched map that cover the image rather than its padding."""
    oh, ow = original_hw
    ch, cw = current_hw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return slice(pad, ch - pad), slice(0, cw)
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return slice(0, ch), slice(pad, cw - pad)


def reduced_shape(rows: int, cols: int, patch_grid: int, max_tiles: Optional[int]) -> Optional[tuple[int, int]]:
    """OneVision's ``anyres_max_N``: a map of more than ~1.1^2 N tiles' worth of patches shrinks to N tiles' worth
    (same aspect), as Hugging Face computes it; None when it stays as it is."""
    if max_tiles is None:
        return None
    ratio = math.sqrt(rows * cols / (max_tiles * patch_grid**2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else None


def _nearest(n_out: int, n_in: int) -> Tensor:
    """For each of ``n_out`` cells resampled from ``n_in``, the nearest source cell (bilinear, half-pixel centres)."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    return torch.floor(src + 0.5).long().clamp(0, n_in - 1)


def layout(image_hw: tuple[int, int], pinpoints, tile_size: int, patch_grid: int,
           max_tiles: Optional[int] = None) -> AnyresLayout:
    """The packed layout of a tiled image of ``image_hw`` (height, width) pixels."""
    h, w = best_resolution(image_hw, pinpoints)
    th, tw = h // tile_size, w // tile_size
    g = patch_grid
    rows, cols = unpadded_span(image_hw, (th * g, tw * g))
    R, C = torch.arange(th * g)[rows], torch.arange(tw * g)[cols]
    tile = 1 + (R[:, None] // g) * tw + (C[None, :] // g)  # +1: the base image comes first
    map_index = tile * g * g + (R[:, None] % g) * g + (C[None, :] % g)  # [rows0, cols0]
    reduced = reduced_shape(len(R), len(C), g, max_tiles)
    n_rows, n_cols = reduced or (len(R), len(C))
    if reduced is not None:  # each kept cell belongs to the tile of its nearest source cell
        R, C = R[_nearest(n_rows, len(R))], C[_nearest(n_cols, len(C))]
    offsets = g * g + torch.arange(n_rows * (n_cols + 1)).view(n_rows, n_cols + 1)
    map_positions, newlines = offsets[:, :-1], offsets[:, -1]
    tiles = {}
    for tr in range(th):
        for tc in range(tw):
            keep_r, keep_c = (R // g) == tr, (C // g) == tc
            if keep_r.any() and keep_c.any():
                tiles[(tr, tc)] = map_positions[keep_r][:, keep_c]
    return AnyresLayout(n_tokens=g * g + n_rows * (n_cols + 1), n_crops=1 + th * tw, patch_grid=g,
                        base=torch.arange(g * g).view(g, g), tile_grid=(th, tw), tiles=tiles,
                        map_positions=map_positions, newlines=newlines, map_index=map_index, reduced=reduced)


def single_layout(patch_grid: int, newline: bool) -> AnyresLayout:
    """An image that is not tiled: its base grid (then one newline: OneVision's multi-image mode)."""
    g = patch_grid
    return AnyresLayout(n_tokens=g * g + int(newline), n_crops=1, patch_grid=g, base=torch.arange(g * g).view(g, g),
                        newlines=torch.tensor([g * g] if newline else [], dtype=torch.long), alone=False)


def crops_layout(tokens_per_side: int, pool: int, crop_grid: tuple[int, int]) -> AnyresLayout:
    """Gemma 3: a thumbnail then ``rows x cols`` pan-and-scan crops (row-major), each ``t x t`` soft tokens."""
    t, n = tokens_per_side, crop_grid[0] * crop_grid[1]
    grids = torch.arange((1 + n) * t * t).view(1 + n, t, t)
    tiles = {(k // crop_grid[1], k % crop_grid[1]): grids[1 + k] for k in range(n)}
    return AnyresLayout(n_tokens=(1 + n) * t * t, n_crops=1 + n, patch_grid=t * pool, base=grids[0],
                        tile_grid=crop_grid if n else (0, 0), tiles=tiles, pool=pool)


def n_tiles(image_hw: tuple[int, int], pinpoints, tile_size: int) -> int:
    """Crops the image processor makes: the base image plus every tile."""
    h, w = best_resolution(image_hw, pinpoints)
    return 1 + (h // tile_size) * (w // tile_size)
