"""From images and prompts to what the model reads: token ids with image placeholders
expanded, pixel values, attention mask and a map of which position is what.

Placeholder convention (LLaVA): each image goes where its placeholder (``<image>``) stands;
a prompt without a placeholder gets one (followed by a newline) at its start for each of
its images. Placeholder and image counts that disagree are a ``ValueError`` naming both.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

ImageLike = Union["PIL.Image.Image", str, Path, Tensor, np.ndarray]  # noqa: F821


# ---------------------------------------------------------------- positions
@dataclass
class RowPositions:
    """The positions of one batch row, by role."""

    image: Int[Tensor, " n_image_pos"]
    text: Int[Tensor, " n_text_pos"]
    last: int
    images: list[Tensor]
    grid_shape: tuple[int, int]
    prompt: str
    offsets: list[tuple[int, int]] = field(repr=False)
    named: dict = field(default_factory=dict, repr=False)  # further named position groups (image markers, newlines)

    def patch(self, row: int, col: int, image: int = 0) -> int:
        """Position of patch (row, col) of the ``image``-th image of this row."""
        rows, cols = self.grid_shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"patch ({row}, {col}) is outside the {rows}x{cols} patch grid")
        if image >= len(self.images):
            raise ValueError(f"this row has {len(self.images)} image(s); image index {image} does not exist")
        positions = self.images[image]
        offset = len(positions) - rows * cols  # a class token (strategy 'full') comes first
        return int(positions[offset + row * cols + col])

    def grid_coordinate(self, position: int) -> Optional[tuple[int, int, int]]:
        """``(image, row, col)`` of an image position, ``(image, -1, -1)`` for a class token, None for text."""
        rows, cols = self.grid_shape
        for i, positions in enumerate(self.images):
            hits = (positions == position).nonzero()
            if len(hits):
                k = int(hits[0]) - (len(positions) - rows * cols)
                return (i, -1, -1) if k < 0 else (i, k // cols, k % cols)
        return None

    def span(self, substring: str, occurrence: int = 0) -> Int[Tensor, " n"]:
        """Text positions whose characters overlap the ``occurrence``-th match of ``substring`` in the prompt."""
        if not self.offsets:
            raise ValueError("span() needs character offsets: load the model with a fast tokenizer")
        start = -1
        for _ in range(occurrence + 1):
            start = self.prompt.find(substring, start + 1)
            if start < 0:
                raise ValueError(f"{substring!r} (occurrence {occurrence}) is not in the prompt {self.prompt!r}")
        end = start + len(substring)
        image = set(self.image.tolist())
        hits = [p for p, (a, b) in enumerate(self.offsets) if a < end and b > start and p not in image]
        if not hits:
            raise ValueError(f"no token covers {substring!r} in the prompt {self.prompt!r}")
        return torch.tensor(hits, dtype=torch.long)


class PositionMap:
    """Positions by role for a batch: ``positions[i]`` is row i's :class:`RowPositions`.

    For a batch of one, ``positions.image``, ``.text``, ``.last``, ``.patch(r, c)``,
    ``.span(s)`` and ``.grid_shape`` read that row directly.
    """

    def __init__(self, rows: list[RowPositions], image_mask: Bool[Tensor, "batch pos"]):
        self.rows = rows
        self.image_mask = image_mask

    def __getitem__(self, i: int) -> RowPositions:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        return torch.tensor([r.last for r in self.rows], dtype=torch.long)

    def _single(self) -> RowPositions:
        if len(self.rows) != 1:
            raise ValueError(
                f"this batch has {len(self.rows)} rows: index one first, e.g. positions[0].image "
                "(or use positions.image_mask / positions.last_positions for the whole batch)"
            )
        return self.rows[0]

    image = property(lambda self: self._single().image)
    text = property(lambda self: self._single().text)
    last = property(lambda self: self._single().last)
    images = property(lambda self: self._single().images)
    grid_shape = property(lambda self: self._single().grid_shape)

    def patch(self, row: int, col: int, image: int = 0) -> int:
        return self._single().patch(row, col, image)

    def span(self, substring: str, occurrence: int = 0) -> Tensor:
        return self._single().span(substring, occurrence)

    def __repr__(self) -> str:
        return f"PositionMap(batch={len(self.rows)}, image_positions={[len(r.image) for r in self.rows]})"


# ---------------------------------------------------------------- inputs
@dataclass
class MultimodalInput:
    """What the model reads. ``shape == input_ids.shape``, so it stands in for tokens in
    ``transformer_lens.patching``."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    pixel_values: Optional[Float[Tensor, "n_images channel height width"]]
    positions: PositionMap
    image_token_id: int
    image_sizes: list = field(default_factory=list)  # (width, height) of each original image, in order
    meta: dict = field(default_factory=dict)  # free-form per-batch annotations (questions, boxes, answers)

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def __repr__(self) -> str:
        pv = "None" if self.pixel_values is None else f"[{', '.join(map(str, self.pixel_values.shape))}]"
        meta = f", meta keys {sorted(self.meta)}" if self.meta else ""
        return (f"MultimodalInput(batch {self.shape[0]}, {self.shape[1]} positions, image positions "
                f"{[len(r.image) for r in self.positions]}, pixel_values {pv}, padded {self.padded}{meta})")

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "MultimodalInput":
        pv = None if self.pixel_values is None else self.pixel_values.to(device)
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       pixel_values=pv)

    def with_pixel_values(self, pixel_values: Tensor) -> "MultimodalInput":
        """The same prompts with other images (same count and shape), e.g. a corrupted run."""
        if self.pixel_values is None or pixel_values.shape != self.pixel_values.shape:
            have = None if self.pixel_values is None else tuple(self.pixel_values.shape)
            raise ValueError(f"pixel_values must keep the shape {have}, got {tuple(pixel_values.shape)}")
        return replace(self, pixel_values=pixel_values)

    def with_input_ids(self, input_ids: Tensor) -> "MultimodalInput":
        """The same images with other token ids at the same positions (e.g. a text corruption)."""
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(f"input_ids must keep the shape {tuple(self.shape)}, got {tuple(input_ids.shape)}")
        same_images = (input_ids == self.image_token_id) == (self.input_ids == self.image_token_id)
        if not bool(same_images.all()):
            raise ValueError("the new input_ids must keep the image positions where they were")
        return replace(self, input_ids=input_ids)


# ---------------------------------------------------------------- building inputs
def load_image(image: Any):
    """A PIL image in RGB from a PIL image (any mode, 16-bit included), a path, or an array.

    Arrays are ``HxW`` or ``HxWxC`` (C in 1, 3, 4): ``uint8`` as is; other integer types scaled from
    their full range (``uint16``: 0..65535); floats must lie in [0, 1] (scaled to 0..255); ``bool``
    is black/white. Anything else, and an image with no pixels, is a ``ValueError`` saying why.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist")
        try:
            image = Image.open(path)
            image.load()
        except OSError as e:
            raise ValueError(f"{str(path)!r} is not an image PIL can read ({e})") from None
    if isinstance(image, Image.Image) and image.mode in WIDE_MODES:
        image = _wide_pixels(image)  # 16-bit or float pixels: scaled below, not clipped to 255
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_to_uint8(image))
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"images must be PIL images, file paths, numpy arrays or pixel tensors, got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image has no pixels (size {image.width}x{image.height})")
    return image.convert("RGB") if image.mode != "RGB" else image


WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL modes whose pixels do not fit in 8 bits


def _wide_pixels(image) -> np.ndarray:
    """The pixels of a 16-bit (modes ``I;16*``, and ``I``, which PIL uses for 16-bit PNGs) or float image."""
    array = np.asarray(image)
    if image.mode == "F":
        return array
    if int(array.min()) < 0 or int(array.max()) > 65535:
        raise ValueError(f"a mode {image.mode!r} image with values in [{array.min()}, {array.max()}] is not a 16-bit "
                         "image: convert it to 8 bits (image.point(...).convert('L')) first")
    return array.astype(np.uint16)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """An ``HxW`` / ``HxWxC`` array of any numeric type -> ``uint8`` (see :func:`load_image`)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"a numpy image must be HxW or HxWxC with C in 1, 3, 4; got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"the image has no pixels (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if np.isnan(array).any() or lo < 0 or hi > 1:
            raise ValueError(f"a float image must have values in [0, 1], got [{lo:.4g}, {hi:.4g}]: divide by 255 "
                             "(0-255 values) or pass a uint8 array")
        return np.round(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.unsignedinteger):  # uint16, uint32, ...: the type's full range
        return np.round(array.astype(np.float64) * (255 / np.iinfo(array.dtype).max)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.signedinteger):  # int32/int64 arrays usually hold 0..255 values
        if int(array.min()) < 0 or int(array.max()) > 255:
            raise ValueError(f"a {array.dtype} image must have values in 0..255, got [{array.min()}, {array.max()}]: "
                             "pass uint8 (0..255) or uint16 (0..65535) arrays")
        return array.astype(np.uint8)
    raise ValueError(f"cannot read an image from an array of dtype {array.dtype}: pass uint8, uint16 or float in [0, 1]")


def preprocess_images(images: Sequence[Any], image_processor, expected: tuple[int, int, int]) -> Tensor:
    """Pixel tensor ``[n_images, C, H, W]``: tensors pass through (checked), the rest go through
    the processor."""
    if not images:
        return None
    tensors, others = [], []
    for image in images:
        (tensors if isinstance(image, Tensor) else others).append(image)
    if tensors and others:
        raise TypeError("mix of pixel tensors and images in one call: pass one kind")
    if tensors:
        pv = torch.cat([t if t.ndim == 4 else t[None] for t in tensors])
    else:
        if image_processor is None:
            raise ValueError("this model has no image processor: pass already-processed pixel tensors")
        pv = image_processor(images=[load_image(i) for i in others], return_tensors="pt")["pixel_values"]
    if tuple(pv.shape[1:]) != expected:
        raise ValueError(
            f"processed images must have shape [n, {', '.join(map(str, expected))}], got {tuple(pv.shape)}; "
            "resize the tensor or pass PIL images so the processor resizes them"
        )
    return pv


def _per_prompt_images(images, prompts: list[str], image_token: str) -> tuple[list[list[Any]], list[str]]:
    """Split ``images`` over the prompts, inserting placeholders where a prompt has none."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    counts = [p.count(image_token) for p in prompts]
    if images and all(isinstance(i, (list, tuple)) for i in images):
        if len(images) != len(prompts):
            raise ValueError(f"got image lists for {len(images)} prompts but {len(prompts)} prompts")
        groups = [list(g) for g in images]
    elif sum(counts) == 0 and images:
        if len(prompts) == 1:
            groups = [list(images)]
        elif len(images) == len(prompts):
            groups = [[i] for i in images]
        else:
            raise ValueError(
                f"{len(images)} images for {len(prompts)} prompts without placeholders: pass one image per "
                f"prompt, a list of image lists, or put {image_token!r} where each image goes"
            )
    else:
        if sum(counts) != len(images):
            raise ValueError(
                f"the prompts have {sum(counts)} image placeholder(s) ({image_token!r}) but {len(images)} "
                f"image(s) were given: pass one image per placeholder"
            )
        it = iter(images)
        groups = [[next(it) for _ in range(c)] for c in counts]
    out_prompts = []
    for prompt, count, group in zip(prompts, counts, groups):
        if count == 0 and group:
            prompt = (image_token + "\n") * len(group) + prompt
        elif count != len(group):
            raise ValueError(
                f"prompt {prompt!r} has {count} image placeholder(s) but {len(group)} image(s) were given for it"
            )
        out_prompts.append(prompt)
    return groups, out_prompts


def build_inputs(
    images,
    prompts: Union[str, Sequence[str]],
    *,
    tokenizer,
    image_processor,
    image_token: str,
    image_token_id: int,
    n_image_tokens: int,
    grid_shape: tuple[int, int],
    pixel_shape: tuple[int, int, int],
    padding_side: Optional[str] = None,
    pad_token_id: int = 0,
    add_special_tokens: bool = True,
) -> MultimodalInput:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    groups, prompts = _per_prompt_images(images, prompts, image_token)
    rows_ids, rows_offsets = [], []
    for prompt in prompts:
        ids, offsets = _tokenize(tokenizer, prompt, add_special_tokens)
        check_vocabulary(tokenizer, prompt, ids, offsets, error=False)
        found = sum(1 for t in ids if t == image_token_id)
        if found != prompt.count(image_token):
            raise ValueError(
                f"the tokenizer turned {prompt.count(image_token)} placeholder(s) into {found} image token(s) "
                f"(id {image_token_id}); is {image_token!r} a special token of this tokenizer?"
            )
        expanded_ids, expanded_offsets = [], []
        for t, o in zip(ids, offsets):
            k = n_image_tokens if t == image_token_id else 1
            expanded_ids += [t] * k
            expanded_offsets += [o] * k
        rows_ids.append(expanded_ids)
        rows_offsets.append(expanded_offsets)
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    length = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    rows = []
    for b, (ids, offsets, prompt, _group) in enumerate(zip(rows_ids, rows_offsets, prompts, groups)):
        start = length - len(ids) if side == "left" else 0
        input_ids[b, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, start:start + len(ids)] = 1
        full_offsets = [(-1, -1)] * length
        full_offsets[start:start + len(ids)] = offsets
        is_image = input_ids[b] == image_token_id
        image_pos = is_image.nonzero().flatten()
        text_pos = (~is_image & attention_mask[b].bool()).nonzero().flatten()
        rows.append(RowPositions(
            image=image_pos, text=text_pos, last=start + len(ids) - 1,
            images=list(image_pos.split(n_image_tokens)) if len(image_pos) else [],
            grid_shape=grid_shape, prompt=prompt,
            offsets=full_offsets if offsets and offsets[0] is not None else [],
        ))
    flat_images = [i for g in groups for i in g]
    pixel_values = preprocess_images(flat_images, image_processor, pixel_shape) if flat_images else None
    if pixel_values is not None and pixel_values.shape[0] != len(flat_images):
        raise ValueError(f"{len(flat_images)} images gave {pixel_values.shape[0]} pixel tensors: pass one tensor per image")
    sizes = [_size_of(i) for i in flat_images]
    return MultimodalInput(input_ids, attention_mask, pixel_values, PositionMap(rows, input_ids == image_token_id),
                           image_token_id, image_sizes=sizes)


def check_vocabulary(tokenizer, text: str, ids: Sequence[int], offsets: Optional[Sequence] = None,
                     error: bool = True) -> None:
    """A ``ValueError`` (a warning with ``error=False``, as for prompts) naming the words of ``text`` that
    the tokenizer reads as its unknown token (word-level tokenizers such as the bundled model's), with
    the closest tokens it has."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids or (tokenizer.unk_token and tokenizer.unk_token in text):
        return
    if offsets and offsets[0] is not None:
        words = list(dict.fromkeys(text[a:b] for t, (a, b) in zip(ids, offsets) if t == unk))
    else:
        words = [text]
    hints = "; ".join(f"{w!r} (closest tokens: {', '.join(map(repr, closest_tokens(tokenizer, w))) or 'none'})"
                      for w in words)
    message = f"not in this model's vocabulary, read as {tokenizer.unk_token!r}: {hints}"
    if error:
        raise ValueError(message)
    warnings.warn(message, stacklevel=4)


def closest_tokens(tokenizer, word: str, n: int = 3) -> list[str]:
    """The tokens of the vocabulary closest in spelling to ``word`` (case first)."""
    import difflib

    vocab = [t for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens]
    clean = {t.lstrip("\u2581\u0120").lower(): t for t in vocab}  # sentencepiece / byte-level word starts
    same_case = [clean[w] for w in [word.lower()] if w in clean]
    near = [clean[w] for w in difflib.get_close_matches(word.lower(), list(clean), n=n, cutoff=0.5)]
    return list(dict.fromkeys(same_case + near))[:n]


def check_context(inputs: "MultimodalInput", n_ctx: int) -> None:
    """A ``ValueError`` when the input has more positions than the model's context window."""
    if inputs.shape[1] > n_ctx:
        images = max(len(r.image) for r in inputs.positions)
        raise ValueError(f"the input has {inputs.shape[1]} positions ({images} of them image positions) but the "
                         f"model's context window (cfg.n_ctx) is {n_ctx}: shorten the prompt or pass fewer images")


def _size_of(image) -> Optional[tuple[int, int]]:
    """(width, height) of an image before processing; None for pixel tensors."""
    if isinstance(image, Tensor):
        return None
    if isinstance(image, np.ndarray):
        return (image.shape[1], image.shape[0])
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            return im.size
    return tuple(image.size)


def aligned_offsets(tokenizer, prompt: str, add_special_tokens: bool, image_token_id: int, counts: Sequence[int],
                    row_ids: Tensor, row_mask: Tensor) -> list:
    """Character offsets for a row built elsewhere (e.g. by a processor that expands placeholders itself):
    the prompt is tokenized with offsets, the i-th placeholder expanded to ``counts[i]`` tokens, and the
    result laid over the row's real positions. Empty if the two tokenizations disagree."""
    ids, offsets = _tokenize(tokenizer, prompt, add_special_tokens)
    if not offsets or offsets[0] is None:
        return []
    it = iter(counts)
    expanded_ids, expanded_offsets = [], []
    for t, o in zip(ids, offsets):
        k = next(it, 1) if t == image_token_id else 1
        expanded_ids += [t] * k
        expanded_offsets += [o] * k
    real = row_mask.bool().nonzero().flatten().tolist()
    if expanded_ids != row_ids[real].tolist():
        return []
    full = [(-1, -1)] * row_ids.shape[0]
    for p, o in zip(real, expanded_offsets):
        full[p] = tuple(o)
    return full


def _tokenize(tokenizer, prompt: str, add_special_tokens: bool) -> tuple[list[int], list]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ids), [None] * len(ids)
