"""Any-resolution tiling of LLaVA-NeXT (LLaVA-1.6): layout, packing and positions.

An image is resized to the best of ``image_grid_pinpoints`` and cut into tiles of the tower's
input size; a downscaled copy (the *base* image) goes first. Every tile (and the base) runs
through the vision tower and the projector. The tiles' patch grids are stitched into one map,
the rows/columns that only cover padding are dropped (*unpadding*), and after each row of
the map comes the learned ``image_newline`` vector. Packed sequence per image::

    base patches (g*g) | map row 0 ... newline | map row 1 ... newline | ...

:func:`layout` computes, for one image size, which feature vector lands at each packed
position (so packing is a single gather), and where each tile, the base and the newlines are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.inputs import RowPositions

NEWLINE = -1  # source index of an image_newline position in a layout


@dataclass
class AnyresLayout:
    """Where everything of one image sits in its packed token sequence (offsets from its first position).

    ``source[k]``: index into the flattened ``[n_tiles + 1, g*g]`` projected features, or ``NEWLINE``.
    ``map_positions [rows, cols]``: packed offset of each cell of the unpadded tile map.
    ``tile_grid``: (tile rows, tile cols) before unpadding; ``tiles[(tr, tc)]``: offsets of that tile's
    kept patches as a ``[kept_rows, kept_cols]`` grid; ``base``: the base image's ``[g, g]`` offsets.
    """

    source: Int[Tensor, "n_tokens"]
    base: Int[Tensor, "g g"]
    map_positions: Int[Tensor, "rows cols"]
    newlines: Int[Tensor, " rows"]
    tile_grid: tuple[int, int]
    tiles: dict
    patch_grid: int

    @property
    def n_tokens(self) -> int:
        return len(self.source)


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


def layout(image_hw: tuple[int, int], pinpoints, tile_size: int, patch_grid: int) -> AnyresLayout:
    """The packed layout of an image of ``image_hw`` (height, width) pixels."""
    h, w = best_resolution(image_hw, pinpoints)
    th, tw = h // tile_size, w // tile_size
    g = patch_grid
    rows, cols = unpadded_span(image_hw, (th * g, tw * g))
    R = torch.arange(th * g)[rows]
    C = torch.arange(tw * g)[cols]
    tile = 1 + (R[:, None] // g) * tw + (C[None, :] // g)  # +1: the base image comes first
    src = tile * g * g + (R[:, None] % g) * g + (C[None, :] % g)  # [rows, cols]
    n_rows, n_cols = src.shape
    with_newline = torch.cat([src, torch.full((n_rows, 1), NEWLINE)], dim=1)
    source = torch.cat([torch.arange(g * g), with_newline.flatten()])
    offsets = g * g + torch.arange(n_rows * (n_cols + 1)).view(n_rows, n_cols + 1)
    map_positions, newlines = offsets[:, :-1], offsets[:, -1]
    tiles = {}
    for tr in range(th):
        for tc in range(tw):
            keep_r = (R // g) == tr
            keep_c = (C // g) == tc
            if keep_r.any() and keep_c.any():
                tiles[(tr, tc)] = map_positions[keep_r][:, keep_c]
    return AnyresLayout(source=source, base=torch.arange(g * g).view(g, g), map_positions=map_positions,
                        newlines=newlines, tile_grid=(th, tw), tiles=tiles, patch_grid=g)


def n_tiles(image_hw: tuple[int, int], pinpoints, tile_size: int) -> int:
    """Crops the image processor makes: the base image plus every tile."""
    h, w = best_resolution(image_hw, pinpoints)
    return 1 + (h // tile_size) * (w // tile_size)


class Anyres(nn.Module):
    """Packs per-tile projected features of LLaVA-NeXT images; holds ``image_newline``."""

    def __init__(self, d_model: int, pinpoints, tile_size: int, patch_grid: int):
        super().__init__()
        self.pinpoints = [list(p) for p in pinpoints]
        self.tile_size, self.patch_grid = tile_size, patch_grid
        self.image_newline = nn.Parameter(torch.zeros(d_model))
        self.hook_tiles = HookPoint()  # [n_crops, g*g, d_model]: projected features of every crop (base first)
        self.hook_packed = HookPoint()  # [n_image_tokens_total, d_model]: what goes into the image positions

    def layout(self, image_hw: tuple[int, int]) -> AnyresLayout:
        return layout(image_hw, self.pinpoints, self.tile_size, self.patch_grid)

    def n_crops(self, image_hw: tuple[int, int]) -> int:
        """Crops of an image of ``image_hw`` (height, width): the base image plus every tile."""
        return n_tiles(image_hw, self.pinpoints, self.tile_size)

    def crops(self, pixel_values: Float[Tensor, "n_images max_crops C H W"], sizes_hw: Sequence[tuple[int, int]]
              ) -> Float[Tensor, "n_crops C H W"]:
        """The crops the processor made for each image (dropping its batch padding), in order."""
        if pixel_values.ndim != 5 or len(sizes_hw) != pixel_values.shape[0]:
            raise ValueError(
                f"LLaVA-NeXT pixel_values must be [n_images, n_crops, C, H, W] with one image size per image; "
                f"got {tuple(pixel_values.shape)} and {len(sizes_hw)} sizes: build inputs with model.to_inputs"
            )
        counts = [n_tiles(hw, self.pinpoints, self.tile_size) for hw in sizes_hw]
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])

    def pack(self, features: Float[Tensor, "n_crops g2 d_model"], sizes_hw: Sequence[tuple[int, int]]
             ) -> Float[Tensor, "n_tokens d_model"]:
        features = self.hook_tiles(features)
        return self.hook_packed(self.arrange(features, sizes_hw, self.image_newline))

    def arrange(self, features: Float[Tensor, "n_crops g2 d"], sizes_hw: Sequence[tuple[int, int]],
                newline: Float[Tensor, " d"]) -> Float[Tensor, "n_tokens d"]:
        """Per-crop vectors (of any width ``d``) in packed order, ``newline`` at the newline positions."""
        out, start = [], 0
        for hw in sizes_hw:
            lay = self.layout(hw)
            n = 1 + lay.tile_grid[0] * lay.tile_grid[1]
            flat = features[start:start + n].flatten(0, 1)
            table = torch.cat([flat, newline[None].to(flat.dtype)])
            index = torch.where(lay.source == NEWLINE, torch.tensor(len(flat)), lay.source).to(flat.device)
            out.append(table[index])
            start += n
        return torch.cat(out)


class AnyresRowPositions(RowPositions):
    """Row positions that know each image's base grid, tiles, newline positions and tile grids."""

    def __init__(self, *args, layouts: Sequence[AnyresLayout] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts = list(layouts)

    def _start(self, image: int) -> int:
        if image >= len(self.images):
            raise ValueError(f"this row has {len(self.images)} image(s); image index {image} does not exist")
        return int(self.images[image][0])

    def patch(self, row: int, col: int, image: int = 0) -> int:
        """Position of patch (row, col) of the *base* image (its ``grid_shape`` grid)."""
        g = self.layouts[image].patch_grid if image < len(self.layouts) else 0
        if not (0 <= row < g and 0 <= col < g):
            raise ValueError(f"patch ({row}, {col}) is outside the {g}x{g} base patch grid")
        return self._start(image) + int(self.layouts[image].base[row, col])

    def base(self, image: int = 0) -> Int[Tensor, "g g"]:
        return self._start(image) + self.layouts[image].base

    def tile(self, tile_row: int, tile_col: int, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Positions of one tile's patches (after unpadding) as a grid."""
        tiles = self.layouts[image].tiles
        if (tile_row, tile_col) not in tiles:
            raise ValueError(f"tile ({tile_row}, {tile_col}) is not in this image's kept tiles {sorted(tiles)}")
        return self._start(image) + tiles[(tile_row, tile_col)]

    def tile_map(self, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Positions of the whole unpadded tile map (every tile patch), as a grid."""
        return self._start(image) + self.layouts[image].map_positions

    def newlines(self, image: int = 0) -> Int[Tensor, " rows"]:
        return self._start(image) + self.layouts[image].newlines

    def tile_grid(self, image: int = 0) -> tuple[int, int]:
        return self.layouts[image].tile_grid

    def image_label(self, position: int) -> str:
        """``<img r,c>`` (base image), ``<img t0,1 r,c>`` (patch r,c of tile 0,1), ``<img nl>`` (newline);
        ``i:`` after ``<img `` past the first image."""
        for i, positions in enumerate(self.images):
            hits = (positions == position).nonzero()
            if not len(hits):
                continue
            k, lay, prefix = int(hits[0]), self.layouts[i], f"{i}:" if i else ""
            g = lay.patch_grid
            if k < g * g:
                return f"<img {prefix}{k // g},{k % g}>"
            if bool((lay.newlines == k).any()):
                return f"<img {prefix}nl>"
            for (tr, tc), grid in lay.tiles.items():
                hit = (grid == k).nonzero()
                if len(hit):
                    return f"<img {prefix}t{tr},{tc} {int(hit[0, 0])},{int(hit[0, 1])}>"
        raise ValueError(f"position {position} is not an image position of this row")

    def grid_coordinate(self, position: int) -> Optional[tuple[int, int, int]]:
        """``(image, row, col)`` for a base-image patch, ``(image, -1, -1)`` for tile patches and newlines."""
        for i, positions in enumerate(self.images):
            hits = (positions == position).nonzero()
            if len(hits):
                k = int(hits[0])
                g = self.layouts[i].patch_grid
                return (i, k // g, k % g) if k < g * g else (i, -1, -1)
        return None


def build_anyres_inputs(model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True):
    """LLaVA-NeXT inputs: the checkpoint's own processor tiles the images and expands the placeholders;
    the positions of every image's base grid, tiles and newlines come from :func:`layout`."""
    from mm_lens.inputs import MultimodalInput, PositionMap, _per_prompt_images, aligned_offsets, load_image

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    groups, prompts = _per_prompt_images(images, prompts, model.image_token)
    flat = [i for g in groups for i in g]
    if any(isinstance(i, Tensor) for i in flat):
        raise TypeError("LLaVA-NeXT tiles each image by its size: pass PIL images, paths or arrays, not pixel tensors")
    flat = [load_image(i) for i in flat]
    processor = model.processor
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError("LLaVA-NeXT inputs need the checkpoint's LlavaNextProcessor (model.processor)")
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side or tokenizer.padding_side
    try:
        enc = processor(images=flat or None, text=prompts, return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    sizes_hw = [(im.height, im.width) for im in flat]
    layouts = [model.anyres.layout(hw) for hw in sizes_hw]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    is_image = ids == model.cfg.image_token_id
    rows, k = [], 0
    g = model.anyres.patch_grid
    for b, (prompt, group) in enumerate(zip(prompts, groups)):
        row_layouts = layouts[k:k + len(group)]
        k += len(group)
        image_pos = is_image[b].nonzero().flatten()
        counts = [lay.n_tokens for lay in row_layouts]
        if sum(counts) != len(image_pos):
            raise ValueError(f"row {b}: the processor made {len(image_pos)} image positions, the tiling layout "
                             f"{sum(counts)} ({counts}): processor and model config disagree")
        real = mask[b].bool()
        rows.append(AnyresRowPositions(
            image=image_pos, text=(~is_image[b] & real).nonzero().flatten(), last=int(real.nonzero().max()),
            images=list(image_pos.split(counts)) if counts else [], grid_shape=(g, g), prompt=prompt,
            offsets=aligned_offsets(tokenizer, prompt, add_special_tokens, model.cfg.image_token_id, counts, ids[b],
                                    mask[b]),
            layouts=row_layouts,
        ))
    pixel_values = enc.get("pixel_values") if flat else None
    return MultimodalInput(ids, mask, pixel_values, PositionMap(rows, is_image), model.cfg.image_token_id,
                           image_sizes=[(w, h) for h, w in sizes_hw])
