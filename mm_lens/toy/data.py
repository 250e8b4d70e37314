"""Synthetic shapes visual question answering with ground-truth boxes.

An image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels split into a ``CELLS`` x ``CELLS`` grid of
cells; 1-3 objects (distinct shapes, distinct colours) sit in distinct cells on a varied,
slightly noisy background. Questions have one-word answers:

- ``what color is the circle ?``  -> a colour
- ``what shape is red ?``         -> a shape
- ``is there a blue square ?``    -> yes / no
- ``where is the triangle ?``     -> a cell name (``top-left`` ... ``bottom-right``)

Every example carries the box of each object (pixels, ``(x0, y0, x1, y1)`` with exclusive
ends) and the box of the object the question is about, so the image patches that hold the
answer are known.

The shipped model (``mm-lens/shapes``) was trained on all ``KINDS`` with 1 to ``MAX_OBJECTS``
objects per image (``python -m mm_lens.toy.train``: 6000 steps, about 11 minutes on one core) and
answers every kind of question (held-out accuracy 100% on 800 examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
PATCH_SIZE = 16  # one patch per cell: each object sits inside exactly one patch
CELLS = 3
CELL = IMAGE_SIZE // CELLS
COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 200), "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
KINDS = ("color", "shape", "exists", "where")
TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is {color} ?",
    "exists": "is there a {color} {shape} ?",
    "where": "where is the {shape} ?",
}
PROMPT = "USER: <image>\n{question} ASSISTANT:"
# the questions the shipped model answers (>= 95% held out): all of them
SOLVED_KINDS = KINDS
MAX_OBJECTS = 3  # the shipped model was trained on 1..MAX_OBJECTS objects per image
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Obj:
    shape: str
    color: str
    cell: int  # row-major index into the CELLS x CELLS grid
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends


@dataclass
class Example:
    """One image, one question, its one-word answer and the ground truth."""

    image: Image.Image
    objects: list[Obj]
    kind: str
    question: str
    answer: str
    target: Optional[int] = None  # index into ``objects`` of the object asked about (None: nothing to find)
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [o.box for o in self.objects]

    @property
    def box(self) -> Optional[tuple[int, int, int, int]]:
        """The box of the object the question is about."""
        return None if self.target is None else self.objects[self.target].box

    def to_inputs(self, model, template: str = PROMPT, with_answer: bool = False):
        """A one-row :class:`~mm_lens.MultimodalInput` with ``meta`` (question, box, answer) filled, as
        :meth:`mm_lens.data.Example.to_inputs`; methods that take a dataset accept these examples."""
        from mm_lens.data import Example as DataExample

        return DataExample(self.image, self.question, self.answer, box=self.box).to_inputs(model, template, with_answer)


def vocabulary() -> list[str]:
    """Every word the prompts and answers use (the tokenizer adds the special tokens)."""
    words = ["USER:", "ASSISTANT:", "what", "color", "is", "the", "shape", "there", "a", "where", "?",
             "yes", "no", *COLORS, *SHAPES, *PLACES]
    return list(dict.fromkeys(words))


def answers(kind: str) -> list[str]:
    """The possible answers to a kind of question."""
    return {"color": list(COLORS), "shape": list(SHAPES), "exists": ["yes", "no"], "where": list(PLACES)}[kind]


# ---------------------------------------------------------------- drawing
def _background(rng: np.random.Generator) -> np.ndarray:
    """A grey-ish background with a random tint, a soft gradient and pixel noise (never a saturated colour)."""
    base = rng.uniform(60, 200) + rng.uniform(-18, 18, size=3)
    ramp = np.linspace(-1, 1, IMAGE_SIZE)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * rng.uniform(0, 25)
    img = base[None, None, :] + grad[..., None] + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    r, b = x1 - 1, y1 - 1  # PIL's rectangle ends are inclusive
    if shape == "circle":
        draw.ellipse([x0, y0, r, b], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, r, b], fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + r) / 2, y0), (r, b), (x0, b)], fill=rgb)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - w // 2 - w % 2, y0, cx + w // 2 - 1, b], fill=rgb)
        draw.rectangle([x0, cy - w // 2 - w % 2, r, cy + w // 2 - 1], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _place(rng: np.random.Generator, cell: int) -> tuple[int, int, int, int]:
    """A box of 9-13 pixels inside ``cell``, jittered so it need not line up with the patches."""
    size = int(rng.integers(9, 14))
    row, col = divmod(cell, CELLS)
    x0 = col * CELL + int(rng.integers(1, CELL - size))
    y0 = row * CELL + int(rng.integers(1, CELL - size))
    return (x0, y0, x0 + size, y0 + size)


def random_scene(rng: np.random.Generator, n_objects: Optional[int] = None) -> tuple[Image.Image, list[Obj]]:
    """An image with 1-3 objects of distinct shapes and colours in distinct cells."""
    n = int(n_objects or rng.integers(1, 4))
    shapes = rng.choice(SHAPES, size=n, replace=False)
    colors = rng.choice(list(COLORS), size=n, replace=False)
    cells = rng.choice(CELLS * CELLS, size=n, replace=False)
    image = Image.fromarray(_background(rng))
    draw = ImageDraw.Draw(image)
    objects = []
    for shape, color, cell in zip(shapes, colors, cells):
        box = _place(rng, int(cell))
        jitter = rng.integers(-15, 16, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[str(color)]) + jitter, 0, 255))
        _draw(draw, str(shape), box, rgb)
        objects.append(Obj(str(shape), str(color), int(cell), box))
    return image, objects


# ---------------------------------------------------------------- questions
def ask(rng: np.random.Generator, image: Image.Image, objects: list[Obj], kind: str) -> Example:
    """A question of ``kind`` about the scene, with its answer and target object."""
    t = int(rng.integers(len(objects)))
    obj = objects[t]
    if kind == "color":
        return Example(image, objects, kind, TEMPLATES[kind].format(shape=obj.shape), obj.color, t)
    if kind == "shape":
        return Example(image, objects, kind, TEMPLATES[kind].format(color=obj.color), obj.shape, t)
    if kind == "where":
        return Example(image, objects, kind, TEMPLATES[kind].format(shape=obj.shape), PLACES[obj.cell], t)
    if kind == "exists":
        if rng.random() < 0.5:
            return Example(image, objects, kind, TEMPLATES[kind].format(color=obj.color, shape=obj.shape), "yes", t)
        present = {(o.color, o.shape) for o in objects}
        pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # half of the "no" questions pair a present colour with a present shape (binding matters)
        bound = [(c, s) for c, s in pairs if c in {o.color for o in objects} and s in {o.shape for o in objects}]
        c, s = bound[int(rng.integers(len(bound)))] if bound and rng.random() < 0.5 else pairs[int(rng.integers(len(pairs)))]
        return Example(image, objects, kind, TEMPLATES[kind].format(color=c, shape=s), "no", None)
    raise ValueError(f"unknown question kind {kind!r}; use one of {KINDS}")


def make_examples(n: int, seed: int, kinds=SOLVED_KINDS, max_objects: Optional[int] = None) -> list[Example]:
    """``n`` examples with 1..``max_objects`` objects, kinds in turn, deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    max_objects = max_objects or MAX_OBJECTS
    out = []
    for i in range(n):
        image, objects = random_scene(rng, int(rng.integers(1, max_objects + 1)))
        out.append(ask(rng, image, objects, kinds[i % len(kinds)]))
    return out


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """CLIP-normalised pixels ``[n, 3, H, W]``; equal to the bundled processor's output at this size."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
