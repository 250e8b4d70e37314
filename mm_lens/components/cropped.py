"""Pipelines whose processor cuts each image into crops of the tower's size (LLaVA-NeXT / OneVision tiles, Gemma 3
pan-and-scan crops): what they share on top of :class:`~mm_lens.components.pipeline.ImagePipeline`.

Each crop runs through LLaVA's fixed-size tower and projector; where its tokens go among the image's positions
is the image's :class:`~mm_lens.components.tiling.AnyresLayout`, which a subclass makes from the processor's
output (``row_layouts``). Inputs are the checkpoint's own processor's (it crops the images and expands the
placeholders, with any marker tokens around them); :class:`AnyresRowPositions` knows every image's base grid,
tiles (crops) and newlines. Boxes go through the whole processor as the image did (same crops), and a position
counts as touched when any patch it reads is (:meth:`~mm_lens.components.tiling.AnyresLayout.touched`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mm_lens.components.pipeline import (
    ImagePipeline,
    as_prompts,
    encoded_inputs,
    encoded_row,
    original_size,
    processor_inputs,
)
from mm_lens.components.tiling import AnyresLayout
from mm_lens.inputs import RowPositions


class CroppedPipeline(ImagePipeline):
    """Images cropped by the processor; subclasses give ``row_layouts`` (and ``features``).

    ``grouped``: the processor reads the images of each prompt together (OneVision's multi-image mode, Gemma 3),
    else one flat list."""

    binds_images = False  # the number of positions of an image depends on its crops
    grouped = False

    def row_layouts(self, model, groups: list[list], enc) -> list[AnyresLayout]:
        """Every image's layout, in order (``groups``: the loaded images of each prompt; ``enc``: the processor's
        output)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- inputs
    def build_inputs(self, model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True,
                     **processor_kwargs):
        """Inputs built by the checkpoint's own processor; the positions of every image's parts come from the
        layouts. ``processor_kwargs`` go to the processor (e.g. Gemma 3's ``do_pan_and_scan=True``) and are kept
        in each layout (boxes go through the processor with them)."""
        from mm_lens.inputs import _per_prompt_images

        groups, prompts = _per_prompt_images(images, as_prompts(prompts), model.image_token)
        flat = [i for g in groups for i in g]
        enc, loaded = processor_inputs(model.processor, groups if self.grouped else flat, prompts, padding_side,
                                       add_special_tokens, model.cfg.original_architecture, replacement_offsets=True,
                                       **processor_kwargs)
        if not self.grouped:  # the loaded images back in their prompts' groups
            it = iter(loaded)
            loaded = [[next(it) for _ in g] for g in groups]
        groups = loaded
        layouts = self.row_layouts(model, groups, enc) if flat else []
        for lay in layouts:
            lay.processor_kwargs = dict(processor_kwargs)
        rows, k = [], 0
        for b, (prompt, group) in enumerate(zip(prompts, groups)):
            row_layouts = layouts[k:k + len(group)]
            k += len(group)
            counts = [lay.n_tokens for lay in row_layouts]
            grid_shape = tuple(row_layouts[0].base.shape) if row_layouts else (0, 0)
            row = encoded_row(AnyresRowPositions, model, enc, b, prompt, counts, add_special_tokens,
                              grid_shape=grid_shape, layouts=row_layouts)
            row.named.update(named_newlines(row, row_layouts))
            rows.append(row)
        return encoded_inputs(model, enc, rows, enc.get("pixel_values") if flat else None,
                              [(im.width, im.height) for g in groups for im in g])

    # ---------------------------------------------------------------- crops and boxes
    def n_crops(self, model, inputs) -> int:
        """Crops the tower runs on for ``inputs``."""
        return sum(lay.n_crops for lay in layouts_of(inputs))

    def image_crops(self, inputs, image: int) -> Float[Tensor, "n_crops C H W"]:
        layouts = layouts_of(inputs)
        pv = inputs.pixel_values
        if pv.ndim == 5:  # [n_images, max_crops, C, H, W]
            return pv[image][:layouts[image].n_crops]
        start = sum(lay.n_crops for lay in layouts[:image])  # crops one after another
        return pv[start:start + layouts[image].n_crops]

    def image_box_masks(self, model, inputs, image: int, box) -> Bool[Tensor, "n_crops rows cols"]:
        return self.box_masks(model, original_size(inputs, image), box, layouts_of(inputs)[image])

    def box_masks(self, model, image_size: tuple[int, int], box, layout: Optional[AnyresLayout] = None
                  ) -> Bool[Tensor, "n_crops rows cols"]:
        """Per crop the processor makes, the patches ``box`` touches: the box drawn on a mask of the image's size
        goes through the whole processor as the image did (``layout``: its crops, processor options, and whether
        it shared its prompt with others), else through the image processor alone."""
        from mm_lens.analysis.groups import box_image, patch_cells

        mask = box_image(image_size, box)
        if layout is not None:
            placeholder = model.processor.image_token
            n = 1 if layout.alone else 2  # OneVision's multi-image mode: the mask as one image of two
            pix = model.processor(images=[[mask] * n], text=[placeholder * n], return_tensors="pt", do_normalize=False,
                                  **layout.processor_kwargs)["pixel_values"]
            pix = (pix[0] if pix.ndim == 5 else pix)[:layout.n_crops, 0]  # [n_crops, H, W]: one channel, no padding
        else:
            pix = model.processor.image_processor(images=[mask], return_tensors="pt", do_normalize=False)["pixel_values"][0]
            pix = (pix[None] if pix.ndim == 3 else pix)[:, 0]  # [n_crops, H, W]: one channel
        return patch_cells(pix, self.vision.patch_size, self.vision.grid_size)

    def tower_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        from mm_lens.memory import tower_shapes

        return tower_shapes(model, self.n_crops(model, inputs))


def layouts_of(inputs) -> list[AnyresLayout]:
    """Every image's layout, in the batch's order."""
    return [lay for row in inputs.positions for lay in row.layouts]


def named_newlines(row: RowPositions, layouts: Sequence[AnyresLayout]) -> dict:
    """The positions of the newlines of a row's images (named group ``image_newline``), if any."""
    if not any(len(lay.newlines) for lay in layouts):
        return {}
    return {"image_newline": torch.cat([p[lay.newlines.to(p.device)] for p, lay in zip(row.images, layouts)])}


# ---------------------------------------------------------------- positions
class AnyresRowPositions(RowPositions):
    """Row positions that know each image's base grid, tiles, newline positions and tile grids."""

    def __init__(self, *args, layouts: Sequence[AnyresLayout] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts = list(layouts)

    def _at(self, image: int, offsets: Tensor) -> Tensor:
        if image >= len(self.images):
            raise ValueError(f"this row has {len(self.images)} image(s); image index {image} does not exist")
        return self.images[image][offsets.to(self.images[image].device)]

    def patch(self, row: int, col: int, image: int = 0) -> int:
        """Position of patch (row, col) of the *base* image (its ``grid_shape`` grid)."""
        rows, cols = self.layouts[image].base.shape if image < len(self.layouts) else (0, 0)
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"patch ({row}, {col}) is outside the {rows}x{cols} base patch grid")
        return int(self._at(image, self.layouts[image].base[row, col]))

    def base(self, image: int = 0) -> Int[Tensor, "g g"]:
        return self._at(image, self.layouts[image].base)

    def tile(self, tile_row: int, tile_col: int, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Positions of one tile's patches (after unpadding) as a grid (Gemma 3: one pan-and-scan crop)."""
        tiles = self.layouts[image].tiles
        if (tile_row, tile_col) not in tiles:
            raise ValueError(f"tile ({tile_row}, {tile_col}) is not in this image's kept tiles {sorted(tiles)}")
        return self._at(image, tiles[(tile_row, tile_col)])

    def tile_map(self, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Positions of the whole unpadded tile map (every tile patch), as a grid."""
        if self.layouts[image].map_positions is None:
            raise ValueError(f"image {image} has no stitched tile map (it is not tiled)")
        return self._at(image, self.layouts[image].map_positions)

    def newlines(self, image: int = 0) -> Int[Tensor, " rows"]:
        return self._at(image, self.layouts[image].newlines)

    def tile_grid(self, image: int = 0) -> tuple[int, int]:
        return self.layouts[image].tile_grid

    def _where(self, position: int) -> Optional[tuple[int, int]]:
        for i, positions in enumerate(self.images):
            hits = (positions == position).nonzero()
            if len(hits):
                return i, int(hits[0])
        return None

    def image_label(self, position: int) -> str:
        """``<img r,c>`` (base image), ``<img t0,1 r,c>`` (patch r,c of tile 0,1), ``<img nl>`` (newline);
        ``i:`` after ``<img `` past the first image."""
        found = self._where(position)
        if found is None:
            raise ValueError(f"position {position} is not an image position of this row")
        i, k = found
        lay, prefix = self.layouts[i], f"{i}:" if i else ""
        hit = (lay.base == k).nonzero()
        if len(hit):
            return f"<img {prefix}{int(hit[0, 0])},{int(hit[0, 1])}>"
        if bool((lay.newlines == k).any()):
            return f"<img {prefix}nl>"
        for (tr, tc), grid in lay.tiles.items():
            hit = (grid == k).nonzero()
            if len(hit):
                return f"<img {prefix}t{tr},{tc} {int(hit[0, 0])},{int(hit[0, 1])}>"
        raise ValueError(f"position {position} is in no part of image {i}'s layout")

    def grid_coordinate(self, position: int) -> Optional[tuple[int, int, int]]:
        """``(image, row, col)`` for a base-image patch, ``(image, -1, -1)`` for tile patches and newlines."""
        found = self._where(position)
        if found is None:
            return None
        i, k = found
        hit = (self.layouts[i].base == k).nonzero()
        return (i, int(hit[0, 0]), int(hit[0, 1])) if len(hit) else (i, -1, -1)
