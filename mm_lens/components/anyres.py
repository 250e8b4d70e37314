"""Images cut into several crops: where each crop's features go and which position is what.

* LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision tile an image (:class:`Anyres`): it is resized to the best of
  ``image_grid_pinpoints`` and cut into tiles of the tower's input size; a downscaled copy (the *base* image)
  goes first. Every crop runs through the vision tower and the projector. The tiles' patch grids are
  stitched into one map, the rows/columns that only cover padding are dropped (*unpadding*); OneVision
  (``anyres_max_N``) then shrinks a map of more than about N tiles' worth of patches by bilinear
  interpolation; after each row of the map comes the learned ``image_newline`` vector::

      base patches (g*g) | map row 0 ... newline | map row 1 ... newline | ...

  OneVision's multi-image mode (several images in one prompt, as its processor does it) does not tile: an
  image there is its base grid followed by one newline.
* Gemma 3's pan-and-scan (:class:`PanAndScan`) adds crops of a wide or tall image after its thumbnail; each
  crop is a full image of soft tokens of its own (no stitching, no newline), between its own start/end markers.

:class:`AnyresLayout` says, for one image, where its base grid, each tile, the stitched map and the newlines
sit among that image's positions; :class:`AnyresRowPositions` turns that into positions and labels, and
:func:`build_anyres_inputs` builds inputs with the checkpoint's own processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.inputs import RowPositions


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


# ---------------------------------------------------------------- the modules
class Anyres(nn.Module):
    """Packs per-crop projected features of LLaVA-NeXT / OneVision images; holds ``image_newline``.

    ``max_tiles``: OneVision's ``anyres_max_N`` (None: no reduction, LLaVA-NeXT). ``multi_image``: OneVision's
    multi-image mode (an image that shares its prompt with others is not tiled)."""

    def __init__(self, d_model: int, pinpoints, tile_size: int, patch_grid: int, max_tiles: Optional[int] = None,
                 multi_image: bool = False):
        super().__init__()
        self.pinpoints = [list(p) for p in pinpoints]
        self.tile_size, self.patch_grid = tile_size, patch_grid
        self.max_tiles, self.multi_image = max_tiles, multi_image
        self.image_newline = nn.Parameter(torch.zeros(d_model))
        self.hook_tiles = HookPoint()  # [n_crops, g*g, d_model]: projected features of every crop (base first)
        self.hook_packed = HookPoint()  # [n_image_tokens_total, d_model]: what goes into the image positions

    def layout(self, image_hw: tuple[int, int], tiled: bool = True) -> AnyresLayout:
        if not tiled:
            return single_layout(self.patch_grid, newline=True)
        return layout(image_hw, self.pinpoints, self.tile_size, self.patch_grid, self.max_tiles)

    def n_crops(self, image_hw: tuple[int, int], tiled: bool = True) -> int:
        """Crops of an image of ``image_hw`` (height, width): the base image plus every tile."""
        return n_tiles(image_hw, self.pinpoints, self.tile_size) if tiled else 1

    def tiled(self, images_per_row: Optional[Sequence[int]], n_images: int) -> list[bool]:
        """Which images are tiled: all (LLaVA-NeXT), or those alone in their prompt (OneVision)."""
        if not self.multi_image or images_per_row is None:
            return [True] * n_images
        flags = [n == 1 for n in images_per_row for _ in range(n)]
        if len(flags) != n_images:
            raise ValueError(f"{n_images} images but the rows hold {sum(images_per_row)}: build inputs with to_inputs")
        return flags

    def processor_images(self, groups: list[list]) -> list:
        """What the processor is given: the images of each prompt grouped (OneVision's multi-image mode), else flat."""
        return [g for g in groups if g] if self.multi_image else [i for g in groups for i in g]

    def crops(self, pixel_values: Float[Tensor, "n_images max_crops C H W"], sizes_hw: Sequence[tuple[int, int]],
              tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_crops C H W"]:
        """The crops the processor made for each image (dropping its batch padding), in order."""
        if pixel_values.ndim != 5 or len(sizes_hw) != pixel_values.shape[0]:
            raise ValueError(
                f"tiled pixel_values must be [n_images, n_crops, C, H, W] with one image size per image; "
                f"got {tuple(pixel_values.shape)} and {len(sizes_hw)} sizes: build inputs with model.to_inputs"
            )
        tiled = tiled or [True] * len(sizes_hw)
        counts = [self.n_crops(hw, t) for hw, t in zip(sizes_hw, tiled)]
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])

    def pack(self, features: Float[Tensor, "n_crops g2 d_model"], sizes_hw: Sequence[tuple[int, int]],
             tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_tokens d_model"]:
        features = self.hook_tiles(features)
        return self.hook_packed(self.arrange(features, sizes_hw, self.image_newline, tiled))

    def arrange(self, features: Float[Tensor, "n_crops g2 d"], sizes_hw: Sequence[tuple[int, int]],
                newline: Float[Tensor, " d"], tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_tokens d"]:
        """Per-crop vectors (of any width ``d``) of every image in packed order, ``newline`` at the newlines."""
        out, start = [], 0
        for hw, t in zip(sizes_hw, tiled or [True] * len(sizes_hw)):
            lay = self.layout(hw, t)
            out.append(lay.arrange(features[start:start + lay.n_crops], newline))
            start += lay.n_crops
        return torch.cat(out)

    def row_layouts(self, groups: list[list], enc) -> list[AnyresLayout]:
        """Every image's layout, in order (``enc``: the processor's output)."""
        tiled = self.tiled([len(g) for g in groups], sum(len(g) for g in groups))
        return [self.layout((im.height, im.width), t) for im, t in zip([i for g in groups for i in g], tiled)]


class PanAndScan(nn.Module):
    """Gemma 3's image layouts (no weights): ``tokens_per_side`` x ``tokens_per_side`` soft tokens per crop, a
    thumbnail and, with the processor's ``do_pan_and_scan``, crops of a wide (or tall) image in a row (column)."""

    def __init__(self, tokens_per_side: int, patch_grid: int):
        super().__init__()
        self.tokens_per_side, self.pool = tokens_per_side, patch_grid // tokens_per_side

    def processor_images(self, groups: list[list]) -> list:
        return [g for g in groups if g]

    def row_layouts(self, groups: list[list], enc) -> list[AnyresLayout]:
        """From the processor's replacement strings: one thumbnail plus as many crops as markers it added."""
        replacements = [r for row in enc["text_replacement_offsets"] for r in row if r["type"] == "image"]
        images = [i for g in groups for i in g]
        out = []
        for im, r in zip(images, replacements):
            n = r["replacement"].count(r["text"]) - 1  # the placeholder is the start marker of each crop
            out.append(crops_layout(self.tokens_per_side, self.pool, (n, 1) if im.height > im.width else (1, n)))
        return out


def make_anyres(cfg) -> Optional[nn.Module]:
    """The tiling module a config asks for: :class:`Anyres` (``image_grid_pinpoints``), :class:`PanAndScan`
    (Gemma 3) or None."""
    if cfg.vision is None:
        return None
    if cfg.extra.get("pan_and_scan"):
        return PanAndScan(cfg.projector.tokens_per_side, cfg.vision.grid_size)
    pinpoints = cfg.extra.get("image_grid_pinpoints")
    if not pinpoints:
        return None
    return Anyres(cfg.d_model, pinpoints, cfg.vision.image_size, cfg.vision.grid_size,
                  max_tiles=cfg.extra.get("anyres_max"), multi_image=bool(cfg.extra.get("multi_image_mode")))


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


# ---------------------------------------------------------------- inputs
def build_anyres_inputs(model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True,
                        **processor_kwargs):
    """Inputs built by the checkpoint's own processor (it crops the images and expands the placeholders, with
    any marker tokens around them); the positions of every image's parts come from the layouts.
    ``processor_kwargs`` go to the processor (e.g. Gemma 3's ``do_pan_and_scan=True``)."""
    from mm_lens.inputs import MultimodalInput, PositionMap, _per_prompt_images, check_context, load_image

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    processor = model.processor
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{model.cfg.original_architecture} inputs need the checkpoint's processor (model.processor)")
    video = getattr(processor, "video_token", None)
    if video and any(video in p for p in prompts):
        raise ValueError(f"videos are not supported: remove {video!r} from the prompt (pass images instead)")
    groups, prompts = _per_prompt_images(images, prompts, model.image_token)
    if any(isinstance(i, Tensor) for g in groups for i in g):
        raise TypeError("this model crops each image by its size: pass PIL images, paths or arrays, not pixel tensors")
    groups = [[load_image(i) for i in g] for g in groups]
    flat = [i for g in groups for i in g]
    enc = _run_processor(processor, model.anyres.processor_images(groups) if flat else None, prompts, padding_side,
                         add_special_tokens, processor_kwargs)
    layouts = model.anyres.row_layouts(groups, enc) if flat else []
    for lay in layouts:
        lay.processor_kwargs = dict(processor_kwargs)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    is_image = ids == model.cfg.image_token_id
    rows, k = [], 0
    for b, (prompt, group) in enumerate(zip(prompts, groups)):
        row_layouts = layouts[k:k + len(group)]
        k += len(group)
        image_pos = is_image[b].nonzero().flatten()
        counts = [lay.n_tokens for lay in row_layouts]
        if sum(counts) != len(image_pos):
            raise ValueError(f"row {b}: the processor made {len(image_pos)} image positions, the layouts "
                             f"{sum(counts)} ({counts}): processor and model config disagree")
        real = mask[b].bool()
        per_image = list(image_pos.split(counts)) if counts else []
        rows.append(AnyresRowPositions(
            image=image_pos, text=(~is_image[b] & real).nonzero().flatten(), last=int(real.nonzero().max()),
            images=per_image, grid_shape=tuple(row_layouts[0].base.shape) if row_layouts else (0, 0), prompt=prompt,
            offsets=_offsets(enc, b, prompt, processor, model, counts, add_special_tokens),
            named=_named_groups(model, ids[b], per_image, row_layouts), layouts=row_layouts,
        ))
    pixel_values = enc.get("pixel_values") if flat else None
    inputs = MultimodalInput(ids, mask, pixel_values, PositionMap(rows, is_image), model.cfg.image_token_id,
                             image_sizes=[(im.width, im.height) for im in flat])
    check_context(inputs, model.cfg.n_ctx)
    return inputs


def _run_processor(processor, images, prompts: list[str], padding_side: Optional[str], add_special_tokens: bool,
                   processor_kwargs: dict):
    """The processor on the prompts (padded), with what each placeholder became and, with a fast tokenizer, the
    character offsets of the expanded text."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side or tokenizer.padding_side
    kwargs = dict(return_tensors="pt", padding=True, add_special_tokens=add_special_tokens,
                  return_text_replacement_offsets=True, **processor_kwargs)
    if getattr(tokenizer, "is_fast", False):
        kwargs.update(return_offsets_mapping=True)
    try:
        return processor(images=images, text=prompts, **kwargs)
    finally:
        tokenizer.padding_side = side


def _offsets(enc, b: int, prompt: str, processor, model, counts, add_special_tokens: bool) -> list:
    """Character offsets in the prompt of each position of row ``b`` ((-1, -1) at padding): the expanded text's
    offsets mapped back through the processor's replacements (a token inside a replacement gets the placeholder's
    span); without them, the prompt's own tokens laid over the row (:func:`mm_lens.inputs.aligned_offsets`)."""
    from mm_lens.inputs import aligned_offsets

    if "offset_mapping" not in enc or "text_replacement_offsets" not in enc:
        return aligned_offsets(processor.tokenizer, prompt, add_special_tokens, model.cfg.image_token_id, counts,
                               enc["input_ids"][b], enc["attention_mask"][b])
    replaced = enc["text_replacement_offsets"][b] if len(enc["text_replacement_offsets"]) > b else []

    def original(c: int, end: bool) -> int:
        shift = 0
        for r in replaced:
            (a, z), (na, nz) = r["span"], r["new_span"]
            if c < na or (end and c == na):
                break
            if c < nz or (end and c == nz):
                return z if end else a
            shift = nz - z
        return c - shift

    out = []
    for (a, z), real in zip(enc["offset_mapping"][b].tolist(), enc["attention_mask"][b].tolist()):
        out.append((original(a, False), original(z, True)) if real else (-1, -1))
    return out


def _named_groups(model, ids: Tensor, per_image: list[Tensor], layouts: list[AnyresLayout]) -> dict:
    """Positions of the image markers (Gemma 3's start/end of image) and of the newlines, by name."""
    named = {}
    for name, key in (("image_start", "image_start_token_id"), ("image_end", "image_end_token_id")):
        token = model.cfg.extra.get(key)
        if token is not None:
            named[name] = (ids == token).nonzero().flatten()
    if any(len(lay.newlines) for lay in layouts):
        named["image_newline"] = torch.cat([p[lay.newlines.to(p.device)] for p, lay in zip(per_image, layouts)])
    return named
