"""The image-pipeline slot: how a family turns images into what its language model reads.

LLaVA-1.5 needs none (``model.image_pipeline is None``): one fixed grid per image, built by
:func:`mm_lens.inputs.build_inputs` and the tower/projector in :mod:`mm_lens.model`. A family with
its own image handling (dynamic resolution, tiling, several positional axes) provides an
:class:`ImagePipeline`, registered in :data:`PIPELINES` under the name its config translation puts
in ``cfg.extra["image_pipeline"]``. :class:`~mm_lens.HookedVLM` then routes through it with a few
generic lines and the analysis code needs no special case:

* ``make_towers(cfg) -> (vision_encoder, vision_projector)``: the family's hooked modules (built on
  the model under those names, so hook names stay ``vision_encoder.*`` and ``vision_projector.*``;
  default: LLaVA's fixed-size tower and projector, :func:`fixed_towers`); ``make_modules(cfg) -> {name:
  module}``: further modules with weights or hooks of the pipeline's own, registered on the model under
  those names (LLaVA-NeXT's ``anyres``: ``image_newline``, ``hook_tiles``, ``hook_packed``); their weights
  sit with the projector (device maps, streaming) and the vectors they write into the residual stream
  (``module.residual_writes``) are centred with the other writes;
* ``build_inputs(model, images, prompts, padding_side, add_special_tokens, **processor_kwargs) ->
  MultimodalInput``: exactly what the family's processor makes (same ``input_ids``; the processor called
  once, by :func:`processor_inputs`), with a :class:`~mm_lens.inputs.PositionMap` whose rows know every
  image's grid (:class:`GridRowPositions`, :func:`encoded_row`) and ``pixel_values`` from which
  ``features`` recomputes the processor's input (the Qwen pipeline keeps each resized image,
  ``[n_images, C, H, W]``, so corruptions and figures see images); ``processor_kwargs`` are options of
  the processor (Gemma 3's ``do_pan_and_scan=True``), refused where they would change what ``features``
  recomputes;
* ``features(model, pixel_values, image_sizes) -> [n_image_positions, d_model]``: the packed features of
  every image position, in sequence order (or ``[n_crops, tokens, d_model]`` when the crops fill the
  positions in order); ``prompt_features(model, pixel_values, image_sizes, images_per_row)``: the same
  knowing how many images each prompt holds (LLaVA-OneVision tiles only an image alone in its prompt;
  by default the grouping does not matter). ``model.image_features`` returns them;
* ``position_ids(model, inputs)``: None (the count of real tokens before each position), or the family's
  own, e.g. ``[3, batch, pos]`` for M-RoPE; computed from ``input_ids``, ``attention_mask`` and the
  position map alone (no pixels), so a continuation built from the same positions gets them too. After a
  key/value cache, new text positions continue from the largest cached one (:func:`continue_positions`);
* ``hook_shapes(model, inputs) -> {hook name: shape}`` of the image side (the cache estimate of
  :mod:`mm_lens.memory`);
* boxes and crops (object / non-object groups, :func:`mm_lens.analysis.groups.box_crop_masks`,
  :func:`mm_lens.analysis.corruptions.mask_region`): ``box_masks(model, image_size, box) -> [n_crops, rows,
  cols]``: the grid cells (one per image position) a box in original-image pixels touches, through the
  processor's own resize; ``image_box_masks(model, inputs, image, box)``: the same for one image of a batch
  (as the processor cropped it there); ``box_positions(model, inputs, row, image, box) -> (inside, outside)``:
  which of an image's positions read a touched cell and which do not (positions that read no cell, such as
  newlines, are in neither); ``image_crops(inputs, image)``: a view of one image's crops in
  ``pixel_values``, in ``box_masks`` order; ``cell_size(model)``: pixels per side of one grid cell;
* ``position_means(model, inputs, crop_means [n_crops, tokens]) -> [n_image_positions]``: per-crop numbers
  read at the projector's output laid over the image positions (:class:`mm_lens.analysis.unprocessed.
  ResidualMeans`: the means centring removed); ``binds_images``: whether ``model.with_images`` can bind
  images to text (a fixed number of positions per image).

A pipeline is a plain object holding no weights (the towers and ``make_modules``' modules do). Pipelines:
Qwen2-VL / Qwen2.5-VL (:mod:`mm_lens.components.qwen_pipeline`), LLaVA-NeXT / OneVision
(:mod:`mm_lens.components.anyres`) and Gemma 3 (:mod:`mm_lens.components.pan_and_scan`), the last two
on the shared cropped-image machinery of :mod:`mm_lens.components.cropped`.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mm_lens.components.projector import make_projector
from mm_lens.components.vision import VisionEncoder
from mm_lens.inputs import RowPositions

PIPELINES = {
    "qwen_vl": "mm_lens.components.qwen_pipeline:QwenPipeline",  # Qwen2-VL, Qwen2.5-VL
    "qwen3_vl": "mm_lens.components.qwen_pipeline:Qwen3Pipeline",  # Qwen3-VL (DeepStack)
    "anyres": "mm_lens.components.anyres:AnyresPipeline",  # LLaVA-NeXT, LLaVA-OneVision
    "pan_and_scan": "mm_lens.components.pan_and_scan:PanAndScanPipeline",  # Gemma 3
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


def fixed_towers(cfg) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """LLaVA's vision tower and projector (one fixed-size grid per image or crop); None where the config has none."""
    return (VisionEncoder(cfg.vision) if cfg.vision is not None else None,
            make_projector(cfg.projector) if cfg.projector is not None else None)


class ImagePipeline:
    """Base of a family's image pipeline (see the module docstring): subclasses implement ``build_inputs``,
    ``features``, ``hook_shapes`` and ``box_masks``; the other methods have defaults that fit one grid of tokens
    per image: ``make_towers`` LLaVA's, no further modules, ``position_ids`` None (1-D), ``box_positions`` the
    first crop's cells in row-major order, ``image_crops`` one crop per image, ``cell_size`` the tower's patch
    size, ``position_means`` the crops' numbers in order."""

    binds_images = True  # model.with_images: text with placeholders can be read with bound images

    def __init__(self, cfg):
        self.vision = cfg.vision

    def make_towers(self, cfg):
        return fixed_towers(cfg)

    def make_modules(self, cfg) -> dict[str, nn.Module]:
        return {}

    def build_inputs(self, model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True,
                     **processor_kwargs):
        raise NotImplementedError

    def features(self, model, pixel_values: Tensor, image_sizes: Sequence) -> Tensor:
        raise NotImplementedError

    def prompt_features(self, model, pixel_values: Tensor, image_sizes: Sequence,
                        images_per_row: Optional[Sequence[int]]) -> Tensor:
        return self.features(model, pixel_values, image_sizes)

    def position_ids(self, model, inputs) -> Optional[Tensor]:
        return None

    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def box_masks(self, model, image_size: tuple[int, int], box) -> Tensor:
        raise NotImplementedError

    def image_box_masks(self, model, inputs, image: int, box) -> Bool[Tensor, "n_crops rows cols"]:
        """``box_masks`` of the batch's image ``image`` (its index among all the batch's images)."""
        return self.box_masks(model, original_size(inputs, image), box)

    def box_positions(self, model, inputs, row: int, image: int, box) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"]]:
        """``(inside, outside)`` over the positions of image ``image`` of batch row ``row``. Rows whose images have
        layouts (crops or tiles): a position is inside when any patch it reads is touched, and newlines are
        neither inside nor outside; otherwise the first crop's mask, flattened."""
        masks = self.image_box_masks(model, inputs, image_index(inputs, row, image), box)
        layouts = getattr(inputs.positions[row], "layouts", None)
        if not layouts:
            return masks[0].flatten(), ~masks[0].flatten()
        touched = layouts[image].touched(masks)
        return touched, ~touched & ~layouts[image].newline_mask

    def image_crops(self, inputs, image: int) -> Float[Tensor, "n_crops C H W"]:
        """Views into ``inputs.pixel_values`` of the crops of the batch's image ``image`` (one per image, or a
        ``[n_images, n_crops, ...]`` tensor's row, batch padding included)."""
        pv = inputs.pixel_values
        return pv[image] if pv.ndim == 5 else pv[image:image + 1]

    def cell_size(self, model) -> int:
        return self.vision.patch_size

    def position_means(self, model, inputs, crop_means: Float[Tensor, "n_crops tokens"]
                       ) -> Float[Tensor, " n_image_positions"]:
        return crop_means.flatten()


def image_index(inputs, row: int, image: int) -> int:
    """The index among all the batch's images of image ``image`` of batch row ``row``."""
    return sum(len(inputs.positions[r].images) for r in range(row)) + image


def original_size(inputs, index: int) -> tuple[int, int]:
    """``(width, height)`` of the batch's image ``index`` before processing (a ValueError if unknown)."""
    if index >= len(inputs.image_sizes) or inputs.image_sizes[index] is None:
        raise ValueError("boxes need the original image size: build the inputs from PIL images or paths")
    return inputs.image_sizes[index]


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


# ---------------------------------------------------------------- building inputs (shared by the pipelines)
def as_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    return prompts


def processor_inputs(processor, images: Sequence, prompts: Sequence[str], padding_side: Optional[str],
                     add_special_tokens: bool, family: str, *, replacement_offsets: bool = False, keep_empty: bool = False,
                     **processor_kwargs):
    """``(encoding, images)``: the family's own processor on ``images`` and ``prompts``, padded on ``padding_side``.

    ``images``: PIL images, paths or arrays (pixel tensors are refused, since the processor sizes each image
    itself), a flat list or one list per prompt (the processor then reads each prompt's images together;
    empty lists are left out unless ``keep_empty``, as Idefics3's processor wants one list per prompt); they come
    back loaded, in the same structure. A video placeholder in a prompt is
    refused. ``replacement_offsets``: the encoding also says what each placeholder became
    (``text_replacement_offsets``) and, with a fast tokenizer, where each token of the expanded text lies
    (``offset_mapping``; :func:`row_offsets` maps them back to the prompt). ``processor_kwargs`` go to the
    processor."""
    from mm_lens.inputs import load_image

    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{family} inputs need the checkpoint's own processor (model.processor)")
    video = getattr(processor, "video_token", None)
    if isinstance(video, str) and any(video in p for p in prompts):
        raise ValueError(f"videos are not supported: remove {video!r} from the prompt (pass images instead)")
    grouped = any(isinstance(i, (list, tuple)) for i in images)
    flat = [i for g in images for i in g] if grouped else list(images)
    if any(isinstance(i, Tensor) for i in flat):
        raise TypeError(f"{family} sizes each image itself: pass PIL images, paths or arrays, not pixel tensors")
    images = [[load_image(i) for i in g] for g in images] if grouped else [load_image(i) for i in images]
    given = [g for g in images if g or keep_empty] if grouped else images
    tokenizer = processor.tokenizer
    kwargs = dict(processor_kwargs)
    if replacement_offsets:
        kwargs.update(return_text_replacement_offsets=True)
        if getattr(tokenizer, "is_fast", False):
            kwargs.update(return_offsets_mapping=True)
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side or tokenizer.padding_side
    try:
        enc = processor(images=given if flat else None, text=list(prompts), return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens, **kwargs)
    finally:
        tokenizer.padding_side = side
    return enc, images


def row_offsets(model, enc, b: int, prompt: str, counts: Sequence[int], add_special_tokens: bool
                ) -> list[tuple[int, int]]:
    """Character offsets in the prompt of each position of row ``b`` of a :func:`processor_inputs` encoding
    ((-1, -1) at padding): made with ``replacement_offsets``, the expanded text's offsets mapped back through the
    processor's replacements (a token inside what a placeholder became gets the placeholder's span); otherwise
    the prompt's own tokens laid over the row, each placeholder expanded to ``counts[i]`` positions
    (:func:`mm_lens.inputs.aligned_offsets`)."""
    from mm_lens.inputs import aligned_offsets

    if "offset_mapping" not in enc or "text_replacement_offsets" not in enc:
        return aligned_offsets(model.processor.tokenizer, prompt, add_special_tokens, model.cfg.image_token_id,
                               counts, enc["input_ids"][b], enc["attention_mask"][b])
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


def marker_positions(model, ids: Int[Tensor, " pos"], real: Bool[Tensor, " pos"]) -> dict[str, Tensor]:
    """The real positions of the marker tokens around images the config names (``image_start_token_id``,
    ``image_end_token_id``), as named groups ``image_start`` / ``image_end``."""
    named = {}
    for name in ("image_start", "image_end"):
        token = model.cfg.extra.get(f"{name}_token_id")
        if token is not None:
            named[name] = (real & (ids == token)).nonzero().flatten()
    return named


def encoded_row(cls, model, enc, b: int, prompt: str, counts: Sequence[int], add_special_tokens: bool,
                **fields) -> RowPositions:
    """Row ``b`` of a processor's encoding as ``cls`` positions: image positions (``counts[i]`` for image i, in
    order; a ValueError if the processor made another number), text, last real position, character offsets
    (:func:`row_offsets`), markers (:func:`marker_positions`), and the ``fields`` of ``cls``."""
    ids, mask = enc["input_ids"][b], enc["attention_mask"][b]
    is_image = ids == model.cfg.image_token_id
    image_pos = is_image.nonzero().flatten()
    if sum(counts) != len(image_pos):
        raise ValueError(f"row {b}: the processor made {len(image_pos)} image positions, the model's image layouts "
                         f"{sum(counts)} ({list(counts)}): processor and model config disagree")
    real = mask.bool()
    return cls(image=image_pos, text=(~is_image & real).nonzero().flatten(), last=int(real.nonzero().max()),
               images=list(image_pos.split(list(counts))) if counts else [], prompt=prompt,
               offsets=row_offsets(model, enc, b, prompt, counts, add_special_tokens),
               named=marker_positions(model, ids, real), **fields)


def encoded_inputs(model, enc, rows: list, pixel_values: Optional[Tensor], image_sizes: list):
    """The :class:`~mm_lens.inputs.MultimodalInput` of a processor's encoding and the rows built from it."""
    from mm_lens.inputs import MultimodalInput, PositionMap

    is_image = enc["input_ids"] == model.cfg.image_token_id
    return MultimodalInput(enc["input_ids"], enc["attention_mask"], pixel_values, PositionMap(rows, is_image),
                           model.cfg.image_token_id, image_sizes=image_sizes)


def largest_grid(grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return (max((g[0] for g in grids), default=0), max((g[1] for g in grids), default=0))
