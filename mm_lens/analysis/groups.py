"""Position groups: one vocabulary for every method.

Names: ``"image"``, ``"text"``, ``"last"``, ``"question"``, ``"object"``, ``"non_object"``, and the named
positions a family's inputs carry (``"image_newline"``: LLaVA-NeXT / OneVision, Idefics3's row breaks; ``"image_start"`` /
``"image_end"``: the markers around each image's soft tokens in Gemma 3, Qwen-VL, InternVL, Idefics3;
``"image_marker"`` / ``"tile_marker"`` / ``"global_marker"``: Idefics3's ``<fake_token_around_image>``,
``<row_r_col_c>`` and ``<global-img>``);
objects: :func:`question` (a substring of the prompt), :func:`object_patches` /
:func:`non_object_patches` (a bounding box in pixels of the original image), :func:`at`
(explicit positions); unions with ``|``. ``"question"``/``"object"``/``"non_object"`` by
name read ``inputs.meta["question"]`` / ``inputs.meta["box"]`` (one per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mm_lens.components.pipeline import image_index, original_size
from mm_lens.inputs import MultimodalInput

NAMES = ("image", "text", "last", "question", "object", "non_object")
NAMED = ("image_newline", "image_start", "image_end",  # read from the row's named positions (RowPositions.named)
         "image_marker", "tile_marker", "global_marker")  # Idefics3 / SmolVLM: the markers around crops


@dataclass(frozen=True)
class Group:
    """A set of positions defined per batch row by ``fn(model, inputs, row) -> LongTensor``."""

    name: str
    fn: Callable

    def positions(self, model, inputs: MultimodalInput, row: int = 0) -> Tensor:
        pos = torch.as_tensor(self.fn(model, inputs, row), dtype=torch.long).flatten().unique(sorted=True)
        if pos.numel() == 0:
            raise ValueError(f"position group {self.name!r} is empty in batch row {row}")
        n = inputs.shape[1]
        if int(pos.min()) < 0 or int(pos.max()) >= n:
            raise ValueError(f"position group {self.name!r} has positions outside 0..{n - 1}: {pos.tolist()}")
        return pos

    def __or__(self, other: "GroupLike") -> "Group":
        other = as_group(other)
        return Group(f"{self.name}|{other.name}",
                     lambda m, x, r: torch.cat([self.positions(m, x, r), other.positions(m, x, r)]))

    def __repr__(self) -> str:
        return f"Group({self.name})"


GroupLike = Union[str, Group, Sequence[int], Tensor, int]


def at(positions: Union[Sequence[int], Tensor, int], name: Optional[str] = None) -> Group:
    """Explicit positions (the same in every row)."""
    pos = torch.as_tensor(positions, dtype=torch.long).flatten()
    return Group(name or f"at{pos.tolist()}", lambda m, x, r: pos)


def question(text: Optional[str] = None) -> Group:
    """The tokens of ``text`` in the prompt (found by character offsets); by default ``inputs.meta['question']``."""

    def fn(model, inputs, row):
        q = text if text is not None else _meta(inputs, "question", row)
        return inputs.positions[row].span(q)

    return Group("question" if text is None else f"question[{text!r}]", fn)


def object_patches(box: Optional[Sequence[float]] = None, image: int = 0) -> Group:
    """Image positions of patches touched by ``box = (x0, y0, x1, y1)`` (pixels of the original image)."""
    return Group("object", lambda m, x, r: _box_positions(m, x, r, box, image, inside=True))


def non_object_patches(box: Optional[Sequence[float]] = None, image: int = 0) -> Group:
    """Image positions of the patches :func:`object_patches` leaves out."""
    return Group("non_object", lambda m, x, r: _box_positions(m, x, r, box, image, inside=False))


_BY_NAME = {
    "image": Group("image", lambda m, x, r: x.positions[r].image),
    "text": Group("text", lambda m, x, r: x.positions[r].text),
    "last": Group("last", lambda m, x, r: torch.tensor([x.positions[r].last])),
    "question": question(),
    "object": object_patches(),
    "non_object": non_object_patches(),
    **{name: Group(name, lambda m, x, r, name=name: _named(x, r, name)) for name in NAMED},
}


def _named(inputs: MultimodalInput, row: int, name: str) -> Tensor:
    named = getattr(inputs.positions[row], "named", {})
    if name not in named:
        raise ValueError(f"this model's inputs have no {name!r} positions (it has {sorted(named) or 'none'})")
    return named[name]


def as_group(group: GroupLike) -> Group:
    if isinstance(group, Group):
        return group
    if isinstance(group, str):
        key = group.replace("-", "_").lower()
        if key not in _BY_NAME:
            raise ValueError(f"unknown position group {group!r}; use one of {list(NAMES + NAMED)}, a list of positions, "
                             "or mm_lens.analysis.groups.question/object_patches/at")
        return _BY_NAME[key]
    if isinstance(group, (int, list, tuple, Tensor)):
        return at(group)
    raise TypeError(f"a position group is a name, a Group or a list of positions, got {type(group).__name__}")


def resolve(model, inputs: MultimodalInput, group: GroupLike, row: int = 0) -> Tensor:
    """Sorted positions of ``group`` in batch row ``row``."""
    return as_group(group).positions(model, inputs, row)


def resolve_batch(model, inputs: MultimodalInput, group: GroupLike) -> list[Tensor]:
    g = as_group(group)
    return [g.positions(model, inputs, r) for r in range(inputs.shape[0])]


def _meta(inputs: MultimodalInput, key: str, row: int):
    if key not in inputs.meta:
        raise ValueError(f"the group needs inputs.meta[{key!r}] (one per row), or pass it explicitly "
                         f"(groups.question('...') / groups.object_patches(box))")
    value = inputs.meta[key]
    return value[row] if isinstance(value, (list, tuple)) and len(value) == inputs.shape[0] and \
        not (key == "box" and len(value) == 4 and not isinstance(value[0], (list, tuple))) else value


# ---------------------------------------------------------------- boxes -> patches
def box_crop_masks(model, image_size: tuple[int, int], box: Sequence[float], layout=None
                   ) -> Bool[Tensor, "n_crops rows cols"]:
    """Bool ``[n_crops, rows, cols]``: per crop the processor makes, the patches touched by ``box``.

    The box (``x0, y0, x1, y1`` in pixels of the original image of ``image_size = (width, height)``)
    is drawn on a mask the size of that image, which goes through the checkpoint's own image
    processor (without normalisation), so it is resized, cropped and (LLaVA-NeXT) tiled exactly as
    the image; each crop is unfolded into patches, and a patch counts if any of its pixels is
    inside (above 0.5 after resampling). Crops: LLaVA-1.5 one (the image); LLaVA-NeXT the base
    image first, then every tile in row-major order (the order of ``pixel_values``). A model with an image
    pipeline gives its own (:meth:`~mm_lens.components.pipeline.ImagePipeline.box_masks`; Qwen-VL: one crop,
    the grid of merged tokens after its resize); ``layout`` (a cropped image's
    :class:`~mm_lens.components.tiling.AnyresLayout`) goes to it: that image's crops, as the whole processor
    made them (an image OneVision does not tile, one of several in a prompt, as such an image).
    """
    pipeline = getattr(model, "image_pipeline", None)
    if pipeline is not None:  # a family's own resize and crops (mm_lens.components.pipeline)
        return pipeline.box_masks(model, image_size, box) if layout is None else \
            pipeline.box_masks(model, image_size, box, layout)
    mask = box_image(image_size, box)
    vision = model.cfg.vision
    processor = getattr(model.processor, "image_processor", None)
    if processor is not None:
        pix = processor(images=[mask], return_tensors="pt", do_normalize=False)["pixel_values"][0]
        pix = (pix[None] if pix.ndim == 3 else pix)[:, 0]  # [n_crops, H, W]: one channel
    else:
        resized = mask.resize((vision.image_size, vision.image_size))
        pix = torch.from_numpy(np.asarray(resized, dtype=np.float32)[..., 0] / 255)[None]
    return patch_cells(pix, vision.patch_size, vision.grid_size)


def patch_cells(pix: Float[Tensor, "n_crops H W"], patch: int, grid: int) -> Bool[Tensor, "n_crops grid grid"]:
    """Per crop of a mask, the ``grid x grid`` patches of ``patch`` pixels with any pixel above 0.5."""
    patches = pix[:, : grid * patch, : grid * patch].reshape(-1, grid, patch, grid, patch).transpose(2, 3)
    return (patches > 0.5).flatten(3).any(-1)


def box_image(image_size: tuple[int, int], box: Sequence[float]):
    """A black RGB image of ``image_size = (width, height)`` with ``box = (x0, y0, x1, y1)`` drawn white."""
    from PIL import Image, ImageDraw

    w, h = image_size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    mask = Image.new("RGB", (w, h))
    ImageDraw.Draw(mask).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
    return mask


def box_patch_mask(model, image_size: tuple[int, int], box: Sequence[float]) -> Bool[Tensor, "rows cols"]:
    """Bool ``[rows, cols]``: the patches of the image (LLaVA-NeXT: of its base image) touched by ``box``;
    see :func:`box_crop_masks` (every crop) for how."""
    return box_crop_masks(model, image_size, box)[0]


def _box_positions(model, inputs, row, box, image, inside: bool) -> Tensor:
    """Image positions of ``image`` in batch row ``row`` whose patch the box touches (``inside``) or not.

    A model with an image pipeline says which of an image's positions are inside and outside
    (:meth:`~mm_lens.components.pipeline.ImagePipeline.box_positions`); cropped images (LLaVA-NeXT, OneVision,
    Gemma 3 pan-and-scan): every position of the base image and of every kept tile or crop counts (a pooled or
    interpolated token if any patch it reads is touched); ``image_newline`` positions are in neither group.
    """
    box = box if box is not None else _meta(inputs, "box", row)
    rp = inputs.positions[row]
    pipeline = getattr(model, "image_pipeline", None)
    if pipeline is not None:
        touched, untouched = pipeline.box_positions(model, inputs, row, image, box)
        return rp.images[image].cpu()[touched if inside else untouched]
    grid = box_crop_masks(model, original_size(inputs, image_index(inputs, row, image)), box)[0]
    rows, cols = grid.shape
    keep = grid if inside else ~grid
    return torch.tensor([rp.patch(r, c, image) for r in range(rows) for c in range(cols) if keep[r, c]],
                        dtype=torch.long)
