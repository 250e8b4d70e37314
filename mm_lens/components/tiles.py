"""Images cut into a grid of tiles plus one whole-image view, every crop the tower's square input: the image
pipelines of Idefics3 / SmolVLM (tiles and a *global image*) and InternVL (tiles and a *thumbnail*).

The processor resizes each image, cuts it into ``rows x cols`` tiles (row-major) and adds the whole image resized
to one crop (Idefics3: always; InternVL: when there is more than one tile); an image small enough for one crop is
that crop alone (``tile_grid == (0, 0)``). Every crop becomes ``side x side`` image tokens (its patch grid
pixel-shuffled), laid in the sequence in the processor's order: the tiles, then the whole-image view, with the
family's marker tokens around them.

Conventions shared with LLaVA-NeXT (:mod:`mm_lens.components.anyres`):

* ``inputs.pixel_values`` is ``[n_images, max_crops, C, S, S]``: each image's whole-image view first (crop 0,
  what figures draw), then its tiles row-major, zero crops after (fewer crops than the batch's most). The
  vision tower and ``vision_projector`` hooks see the crops in this order (``[n_crops_total, ...]``); the
  projected tokens go into the sequence in the processor's order.
* :class:`TiledRowPositions`: ``patch(r, c, image)`` and the labels ``<img r,c>`` are cells of the whole-image
  view (``grids[i]``, ``grid_shape``); ``tile(tr, tc, image)`` each tile's ``side x side`` positions, labelled
  ``<img t0,1 r,c>``; ``global_image(image)``; ``tile_grid(image)``; ``layouts[i]`` the :class:`TileLayout`.
* Object boxes go through the processor's own resize and split: every crop's tokens a box touches
  (:meth:`TiledPipeline.box_masks`, one mask per crop, crop 0 the whole-image view).

A family subclasses :class:`TiledPipeline` with its towers, how the processor sizes crops and tiles, where its
marker tokens are (named position groups) and how the processor lays out ``pixel_values``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mm_lens.components.pipeline import GridRowPositions, ImagePipeline, as_prompts, encoded_inputs, processor_inputs

Size = tuple[int, int]  # (width, height) of an original image


# ---------------------------------------------------------------- one image's crops and tokens
@dataclass(frozen=True)
class TileLayout:
    """One image: ``tile_grid`` (rows, cols) of tiles ((0, 0): one crop, the whole image) and ``side`` tokens per
    side of every crop. Offsets index the image's positions (``row.images[i]``); crop ``k`` is in
    ``pixel_values`` order (0: the whole-image view, ``1 + tr * cols + tc``: tile (tr, tc))."""

    tile_grid: tuple[int, int]
    side: int

    @property
    def n_tiles(self) -> int:
        return self.tile_grid[0] * self.tile_grid[1]

    @property
    def n_crops(self) -> int:
        return self.n_tiles + 1 if self.n_tiles else 1

    @property
    def n_tokens(self) -> int:
        return self.n_crops * self.side**2

    def crop(self, k: int) -> Int[Tensor, "side side"]:
        """Token offsets of crop ``k`` (0: the whole-image view, whose tokens come after the tiles')."""
        n = self.side**2
        start = self.n_tiles * n if k == 0 else (k - 1) * n
        return torch.arange(start, start + n).view(self.side, self.side)

    @property
    def base(self) -> Int[Tensor, "side side"]:
        return self.crop(0)

    @property
    def tiles(self) -> dict:
        """``{(tile_row, tile_col): offsets [side, side]}``, row-major."""
        rows, cols = self.tile_grid
        return {(tr, tc): self.crop(1 + tr * cols + tc) for tr in range(rows) for tc in range(cols)}

    @property
    def newline_mask(self) -> Bool[Tensor, " n_tokens"]:
        """No image position is a newline here (the families' row breaks are text tokens)."""
        return torch.zeros(self.n_tokens, dtype=torch.bool)

    def touched(self, masks: Bool[Tensor, "n_crops side side"]) -> Bool[Tensor, " n_tokens"]:
        """Which of the image's positions a per-crop token mask marks (crops in ``pixel_values`` order)."""
        out = torch.zeros(self.n_tokens, dtype=torch.bool)
        for k in range(self.n_crops):
            out[self.crop(k).flatten()] = masks[k].flatten().cpu()
        return out

    def to_sequence(self, crops: Tensor) -> Tensor:
        """Per-crop values (``pixel_values`` order, crops first) in the sequence's order: tiles, then the view."""
        return crops if self.n_crops == 1 else torch.cat([crops[1:], crops[:1]])

    def to_storage(self, crops: Tensor) -> Tensor:
        """The inverse of :meth:`to_sequence`: the processor's crops (tiles, then the view) with the view first."""
        return crops if self.n_crops == 1 else torch.cat([crops[-1:], crops[:-1]])


class TiledRowPositions(GridRowPositions):
    """Row positions that know each image's tiles and whole-image view (module docstring)."""

    def __init__(self, *args, layouts: Sequence[TileLayout] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts = list(layouts)
        self._where: Optional[dict] = None  # position -> (image, crop, row, col), built on first use

    def _at(self, image: int, offsets: Tensor) -> Tensor:
        if image >= len(self.images):
            raise ValueError(f"this row has {len(self.images)} image(s); image index {image} does not exist")
        return self.images[image][offsets.to(self.images[image].device)]

    def patch(self, row: int, col: int, image: int = 0) -> int:
        """Position of token (row, col) of image ``image``'s whole-image view (Idefics3's global image, InternVL's
        thumbnail, or the image's only crop)."""
        side = self.layouts[image].side if image < len(self.layouts) else 0
        if not (0 <= row < side and 0 <= col < side):
            raise ValueError(f"patch ({row}, {col}) is outside the {side}x{side} token grid of the whole-image view")
        return int(self._at(image, self.layouts[image].base[row, col]))

    def global_image(self, image: int = 0) -> Int[Tensor, "side side"]:
        """Positions of the whole-image view's tokens, as a grid."""
        return self._at(image, self.layouts[image].base)

    def tile(self, tile_row: int, tile_col: int, image: int = 0) -> Int[Tensor, "side side"]:
        """Positions of tile (tile_row, tile_col)'s tokens, as a grid."""
        tiles = self.layouts[image].tiles if image < len(self.layouts) else {}
        if (tile_row, tile_col) not in tiles:
            raise ValueError(f"tile ({tile_row}, {tile_col}) is not one of image {image}'s tiles {sorted(tiles)}")
        return self._at(image, tiles[(tile_row, tile_col)])

    def tile_grid(self, image: int = 0) -> tuple[int, int]:
        """(rows, cols) of image ``image``'s tiles; (0, 0) when it is one crop."""
        return self.layouts[image].tile_grid

    def _locate(self, position: int) -> Optional[tuple[int, int, int, int]]:
        if self._where is None:
            self._where = {}
            for i, (positions, lay) in enumerate(zip(self.images, self.layouts)):
                for k in range(lay.n_crops):
                    for (r, c), offset in zip(_cells(lay.side), lay.crop(k).flatten().tolist()):
                        self._where[int(positions[offset])] = (i, k, r, c)
        return self._where.get(int(position))

    def grid_coordinate(self, position: int) -> Optional[tuple[int, int, int]]:
        """``(image, row, col)`` in the whole-image view, ``(image, -1, -1)`` for tile tokens, None elsewhere."""
        found = self._locate(position)
        if found is None:
            return None
        i, k, r, c = found
        return (i, r, c) if k == 0 else (i, -1, -1)

    def image_label(self, position: int) -> str:
        """``<img r,c>`` (whole-image view), ``<img t0,1 r,c>`` (tile 0,1); ``i:`` after ``<img `` past the first."""
        found = self._locate(position)
        if found is None:
            raise ValueError(f"position {position} is not an image position of this row")
        i, k, r, c = found
        prefix = f"{i}:" if i else ""
        if k == 0:
            return f"<img {prefix}{r},{c}>"
        tr, tc = divmod(k - 1, self.layouts[i].tile_grid[1])
        return f"<img {prefix}t{tr},{tc} {r},{c}>"


def _cells(side: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(side) for c in range(side)]


# ---------------------------------------------------------------- the pipeline
class TiledPipeline(ImagePipeline):
    """The image pipeline of a tiling family (module docstring). Subclasses give ``family`` (for messages) and:

    * ``make_towers(cfg)``; ``tower(model, crops) -> [n_crops, n_patches, d_vision]`` (what the projector reads);
    * ``crop_pixels(model) -> int`` (the crops' side in pixels) and ``tile_grid(model, size) -> (rows, cols)``
      (the processor's rule for an image of ``size`` = (width, height));
    * ``processor_crops(enc, layouts_per_row) -> [per image: [n_crops, C, S, S]]`` (processor order);
    * ``named_positions(model, ids, images, layouts) -> {name: positions}`` and ``spans`` (each image's replacement
      in the row, first and last position), checking the marker tokens;
    * ``tower_shapes(model, n_crops) -> {hook: shape}``.
    """

    family = "tiled"
    grouped = False  # the processor takes the images as one list per prompt

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scale = int(cfg.extra["pixel_shuffle"])

    # ---------------------------------------------------------------- layouts
    def side(self, model) -> int:
        """Image tokens per side of one crop."""
        return self.crop_pixels(model) // (self.vision.patch_size * self.scale)

    def layout(self, model, size: Size) -> TileLayout:
        if size is None:
            raise ValueError(f"{self.family} needs each image's original size (its tiles depend on it): build the "
                             "inputs with model.to_inputs from PIL images, paths or arrays")
        return TileLayout(tuple(self.tile_grid(model, size)), self.side(model))

    # ---------------------------------------------------------------- inputs
    def build_inputs(self, model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True):
        from mm_lens.inputs import _per_prompt_images

        groups, prompts = _per_prompt_images(images, as_prompts(prompts), model.image_token)  # videos: processor_inputs
        images = groups if self.grouped else [i for g in groups for i in g]
        enc, loaded = processor_inputs(model.processor, images, prompts, padding_side, add_special_tokens, self.family,
                                       keep_empty=True)
        flat = [i for g in loaded for i in g] if self.grouped else loaded
        sizes = [(im.width, im.height) for im in flat]
        layouts = [self.layout(model, s) for s in sizes]
        per_row = [layouts[sum(map(len, groups[:b])):][:len(g)] for b, g in enumerate(groups)]
        ids, mask = enc["input_ids"], enc["attention_mask"]
        is_image = ids == model.cfg.image_token_id
        rows = [self._row(model, b, prompt, ids[b], mask[b], is_image[b], lays, add_special_tokens)
                for b, (prompt, lays) in enumerate(zip(prompts, per_row))]
        pixels = self._stack(self.processor_crops(enc, per_row), layouts) if flat else None
        return encoded_inputs(model, enc, rows, pixels, sizes)

    def _row(self, model, b: int, prompt: str, ids: Tensor, mask: Tensor, is_image: Tensor,
             layouts: list[TileLayout], add_special_tokens: bool) -> TiledRowPositions:
        image_pos = is_image.nonzero().flatten()
        counts = [lay.n_tokens for lay in layouts]
        if sum(counts) != len(image_pos):
            raise ValueError(f"row {b}: the processor made {len(image_pos)} image positions, the tile layouts "
                             f"{[lay.tile_grid for lay in layouts]} make {sum(counts)}: processor and model config "
                             "disagree")
        per_image = list(image_pos.split(counts)) if counts else []
        real = mask.bool()
        spans = self.spans(model, ids, per_image)
        return TiledRowPositions(
            image=image_pos, text=(~is_image & real).nonzero().flatten(), last=int(real.nonzero().max()),
            images=per_image, grid_shape=(layouts[0].side,) * 2 if layouts else (0, 0), prompt=prompt,
            offsets=replacement_offsets(model.tokenizer, prompt, add_special_tokens, model.cfg.image_token_id, spans,
                                        ids, mask),
            named=self.named_positions(model, ids, per_image, spans, layouts),
            grids=[(lay.side, lay.side) for lay in layouts], layouts=layouts,
        )

    def _stack(self, crops: list[Tensor], layouts: list[TileLayout]) -> Float[Tensor, "n_images max_crops C S S"]:
        """Each image's crops with its whole-image view first, zero crops after (module docstring)."""
        for c, lay in zip(crops, layouts):
            if c.shape[0] != lay.n_crops:
                raise ValueError(f"the processor made {c.shape[0]} crops of an image, its tile grid {lay.tile_grid} "
                                 f"makes {lay.n_crops}: processor and model config disagree")
        out = crops[0].new_zeros(len(crops), max(c.shape[0] for c in crops), *crops[0].shape[1:])
        for i, (c, lay) in enumerate(zip(crops, layouts)):
            out[i, :lay.n_crops] = lay.to_storage(c)
        return out

    # ---------------------------------------------------------------- features
    def features(self, model, pixel_values: Float[Tensor, "n_images max_crops C S S"], image_sizes: Sequence
                 ) -> Float[Tensor, "n_image_positions d_model"]:
        """Tower and projector on every image's crops; the tokens in sequence order (tiles, then the view)."""
        if pixel_values.ndim != 5:
            raise ValueError(f"{self.family} pixel_values are [n_images, max_crops, C, S, S] (as model.to_inputs "
                             f"makes them), got shape {tuple(pixel_values.shape)}")
        if image_sizes is None or len(image_sizes) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but image sizes {image_sizes}: build the inputs with "
                             "model.to_inputs")
        layouts = [self.layout(model, s) for s in image_sizes]
        crops = torch.cat([pv[:lay.n_crops] for pv, lay in zip(pixel_values, layouts)])
        hidden = self.tower(model, crops)
        tokens = model.vision_projector(hidden.to(model.vision_projector.W_in.device))
        out, start = [], 0
        for lay in layouts:
            out.append(lay.to_sequence(tokens[start:start + lay.n_crops]).flatten(0, 1))
            start += lay.n_crops
        return torch.cat(out)

    # ---------------------------------------------------------------- what memory estimates and groups read
    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        cfg = model.cfg
        n = sum(self.layout(model, s).n_crops for s in inputs.image_sizes)
        patches = (self.crop_pixels(model) // self.vision.patch_size) ** 2
        tokens, proj = self.side(model) ** 2, cfg.projector
        out = self.tower_shapes(model, n)
        out["vision_projector.hook_in"] = (n, patches, self.vision.d_model)
        out["vision_projector.hook_shuffled"] = (n, tokens, proj.d_in)
        if proj.kind == "pixel_shuffle_mlp":
            out["vision_projector.ln.hook_scale"] = (n, tokens, 1)
            out["vision_projector.ln.hook_normalized"] = (n, tokens, proj.d_in)
            out["vision_projector.hook_hidden"] = (n, tokens, proj.d_out)
        out["vision_projector.hook_out"] = (n, tokens, proj.d_out)
        return out

    def cell_size(self, model) -> int:
        """Pixels per side of the crop cell one image token covers."""
        return self.vision.patch_size * self.scale

    def box_masks(self, model, image_size: Size, box) -> Bool[Tensor, "n_crops side side"]:
        """Per crop (``pixel_values`` order), the tokens a box touches: the box drawn on a mask of the original size
        goes through the checkpoint's image processor (its resize, tiles and whole-image view; no normalisation);
        a token counts if any pixel of its cell is above 0.5."""
        from mm_lens.analysis.groups import box_image

        processor = model.processor
        settings = {**getattr(processor, "images_kwargs", {}), "do_normalize": False}
        enc = processor.image_processor(images=[box_image(image_size, box)], return_tensors="pt", **settings)
        lay = self.layout(model, image_size)
        crops = lay.to_storage(self.processor_crops(enc, [[lay]])[0])[:, 0]  # [n_crops, S, S]: one channel
        c, side = self.cell_size(model), lay.side
        cells = crops[:, :side * c, :side * c].reshape(-1, side, c, side, c).transpose(2, 3)
        return (cells > 0.5).flatten(3).any(-1)

    # ---------------------------------------------------------------- settings
    @staticmethod
    def setting(processor, name: str):
        """An image setting as the processor applies it: its own default (``images_kwargs``), else the image
        processor's."""
        defaults = getattr(processor, "images_kwargs", None) or {}
        return defaults[name] if name in defaults else getattr(processor.image_processor, name)


def size_field(setting, key: str, default=None):
    """A field of an image-processor size setting (a dict or a ``SizeDict``)."""
    value = setting.get(key) if isinstance(setting, dict) else getattr(setting, key, None)
    return default if value is None else value


def replacement_offsets(tokenizer, prompt: str, add_special_tokens: bool, placeholder: int,
                        spans: Sequence[tuple[int, int]], row_ids: Tensor, row_mask: Tensor) -> list:
    """Character offsets in the prompt of each position of a row the processor built ((-1, -1) at padding): the
    prompt's tokens laid over the row, each placeholder over its image's whole replacement (``spans``: first and
    last position, markers included), which gets the placeholder's span. Empty if the two disagree anywhere."""
    from mm_lens.inputs import _tokenize

    ids, offsets = _tokenize(tokenizer, prompt, add_special_tokens)
    if not offsets or offsets[0] is None:
        return []
    real = row_mask.bool().nonzero().flatten().tolist()
    full = [(-1, -1)] * row_ids.shape[0]
    spans, p = iter(spans), 0  # p: index into the real positions
    for t, o in zip(ids, offsets):
        if t == placeholder:
            start, end = next(spans, (None, None))
            if start is None or p >= len(real) or real[p] != start:
                return []
            for q in range(start, end + 1):
                full[q] = tuple(o)
            p += end - start + 1
        elif p < len(real) and int(row_ids[real[p]]) == t:
            full[real[p]] = tuple(o)
            p += 1
        else:
            return []
    return full if p == len(real) and next(spans, None) is None else []
