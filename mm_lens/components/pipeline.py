"""The image-pipeline slot: how a family turns images into what its language model reads.

LLaVA-1.5 needs none (``model.image_pipeline is None``): one fixed grid per image, built by
:func:`mm_lens.inputs.build_inputs` and the tower/projector in :mod:`mm_lens.model`. A family with
its own image handling (dynamic resolution, tiling, several positional axes) provides an
:class:`ImagePipeline`, registered in :data:`PIPELINES` under the name its config translation puts
in ``cfg.extra["image_pipeline"]``. :class:`~mm_lens.HookedVLM` then routes through it with a few
generic lines and the analysis code needs no special case:

* ``make_towers(cfg) -> (vision_encoder, vision_projector)``: the family's hooked modules (built on
  the model under those names, so hook names stay ``vision_encoder.*`` and ``vision_projector.*``);
* ``build_inputs(model, images, prompts, padding_side, add_special_tokens) -> MultimodalInput``: exactly
  what the family's processor makes (same ``input_ids``), with a :class:`~mm_lens.inputs.PositionMap`
  whose rows know every image's grid (:class:`GridRowPositions`) and ``pixel_values`` from which
  ``features`` recomputes the processor's input (the Qwen pipeline keeps each resized image,
  ``[n_images, C, H, W]``, so corruptions and figures see images);
* ``features(model, pixel_values, image_sizes) -> [n_image_positions, d_model]``: the packed features of
  every image position, in sequence order (``model.image_features`` returns them);
* ``position_ids(model, inputs)``: None (the count of real tokens before each position), or the family's
  own, e.g. ``[3, batch, pos]`` for M-RoPE; computed from ``input_ids``, ``attention_mask`` and the
  position map alone (no pixels), so a continuation built from the same positions gets them too. After a
  key/value cache, new text positions continue from the largest cached one (:func:`continue_positions`);
* ``hook_shapes(model, inputs) -> {hook name: shape}`` of the image side (the cache estimate of
  :mod:`mm_lens.memory`); ``box_masks(model, image_size, box) -> [n_crops, rows, cols]``: the grid cells
  (one per image position) a box in original-image pixels touches, through the processor's own resize
  (object / non-object groups, :func:`mm_lens.analysis.groups.box_crop_masks`); ``cell_size(model)``:
  pixels per side of one grid cell of ``pixel_values``.

A pipeline holds no weights of its own here (the towers do); one that needs weights or hooks can be an
``nn.Module`` and is then registered as the submodule ``image_pipeline``.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

from jaxtyping import Int
from torch import Tensor

from mm_lens.inputs import RowPositions

PIPELINES = {
    "qwen_vl": "mm_lens.components.qwen_pipeline:QwenPipeline",  # Qwen2-VL, Qwen2.5-VL
    "idefics3": "mm_lens.components.idefics_pipeline:Idefics3Pipeline",  # Idefics3, SmolVLM
    "internvl": "mm_lens.components.internvl_pipeline:InternVLPipeline",  # InternVL
}


def make_image_pipeline(cfg):
    """The pipeline ``cfg.extra["image_pipeline"]`` names (None when the config names none)."""
    name = cfg.extra.get("image_pipeline")
    if not name:
        return None
    if name not in PIPELINES:
        raise ValueError(f"unknown image pipeline {name!r}; known: {sorted(PIPELINES)}")
    module, _, cls = PIPELINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)


class ImagePipeline:
    """Base of a family's image pipeline (see the module docstring): subclasses implement ``make_towers``,
    ``build_inputs``, ``features``, ``hook_shapes`` and ``box_masks``; ``position_ids`` defaults to None (1-D)
    and ``cell_size`` to the tower's patch size."""

    def __init__(self, cfg):
        self.vision = cfg.vision

    def make_towers(self, cfg):
        raise NotImplementedError

    def build_inputs(self, model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True):
        raise NotImplementedError

    def features(self, model, pixel_values: Tensor, image_sizes: Sequence) -> Tensor:
        raise NotImplementedError

    def position_ids(self, model, inputs) -> Optional[Tensor]:
        return None

    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def box_masks(self, model, image_size: tuple[int, int], box) -> Tensor:
        raise NotImplementedError

    def cell_size(self, model) -> int:
        return self.vision.patch_size


def continue_positions(cached: Int[Tensor, "3 batch n_cached"], new_mask: Int[Tensor, "batch n_new"]
                       ) -> Int[Tensor, "3 batch n_new"]:
    """Multi-axis position ids of new text tokens after cached ones: each real new token one past the largest
    cached position of its row, on every axis (M-RoPE: Hugging Face's ``rope_deltas``)."""
    start = cached.amax(dim=(0, -1))[:, None]
    ids = start + new_mask.long().cumsum(-1).to(start.device)
    return ids[None].expand(cached.shape[0], -1, -1)


class GridRowPositions(RowPositions):
    """Row positions where each image has its own grid of tokens (dynamic resolution).

    ``grids[i]``: (rows, cols) of image i's tokens, row-major in ``images[i]``. ``grid_shape`` is the largest grid
    (figures lay every image on it). Marker tokens around an image (Qwen's ``<|vision_start|>`` /
    ``<|vision_end|>``) are named positions (``named["image_start"]``, ``named["image_end"]``), not image positions.
    """

    def __init__(self, *args, grids: Sequence[tuple[int, int]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.grids = [tuple(g) for g in grids]

    def patch(self, row: int, col: int, image: int = 0) -> int:
        """Position of the token at (row, col) of image ``image``'s grid."""
        if image >= len(self.images):
            raise ValueError(f"this row has {len(self.images)} image(s); image index {image} does not exist")
        rows, cols = self.grids[image]
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"patch ({row}, {col}) is outside image {image}'s {rows}x{cols} token grid")
        return int(self.images[image][row * cols + col])

    def grid_coordinate(self, position: int) -> Optional[tuple[int, int, int]]:
        """``(image, row, col)`` of an image position, None elsewhere."""
        for i, positions in enumerate(self.images):
            hits = (positions == position).nonzero()
            if len(hits):
                k, cols = int(hits[0]), self.grids[i][1]
                return i, k // cols, k % cols
        return None

    def image_label(self, position: int) -> str:
        """``<img r,c>``; ``<img i:r,c>`` past the first image."""
        i, r, c = self.grid_coordinate(position)
        return f"<img {f'{i}:' if i else ''}{r},{c}>"


def processor_inputs(processor, images: Sequence, prompts: Sequence[str], padding_side: Optional[str],
                     add_special_tokens: bool, family: str, grouped: bool = False):
    """``(encoding, images)``: the family's own processor on ``images`` (PIL images, paths or arrays; pixel tensors
    are refused, since the processor sizes each image itself) and ``prompts``, padded on ``padding_side``.
    ``grouped``: ``images`` is one list per prompt and goes to the processor so (SmolVLM's processor does not
    split a flat list over the prompts); the returned images are flat either way."""
    from mm_lens.inputs import load_image

    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{family} inputs need the checkpoint's own processor (model.processor)")
    flat = [i for g in images for i in g] if grouped else list(images)
    if any(isinstance(i, Tensor) for i in flat):
        raise TypeError(f"{family} sizes each image itself: pass PIL images, paths or arrays, not pixel tensors")
    flat = [load_image(i) for i in flat]
    loaded = iter(flat)
    given = [[next(loaded) for _ in g] for g in images] if grouped else flat
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side or tokenizer.padding_side
    try:
        enc = processor(images=given if flat else None, text=list(prompts), return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    return enc, flat


def largest_grid(grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return (max((g[0] for g in grids), default=0), max((g[1] for g in grids), default=0))
