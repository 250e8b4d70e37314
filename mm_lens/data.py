"""A small dataset format for the multimodal experiments: JSONL + an image folder.

One JSON object per line::

    {"image": "images/0001.jpg", "question": "what is the color of this building ?",
     "answer": "red", "constraint": "this building", "box": [12, 30, 80, 96], "id": "0001"}

``image`` is a path relative to the JSONL file's folder (or to ``image_dir``); ``constraint``
(the constraint span of VQA-Constraints, its ``main_entity``) and ``box`` (an object bounding box
in pixels of the original image, ``[x0, y0, x1, y1]``; ``box_format="xywh"`` converts GQA-style
``[x, y, w, h]``) are optional; any other key is kept in ``Example.extra``.
:func:`load_hf` reads a Hugging Face ``datasets`` dataset (or any iterable of dicts) with the same
columns (``main_entity`` and ``bbox`` are accepted as aliases).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

# Prompt templates; ``{question}`` is filled in, ``<image>`` becomes the model's image token.
LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# The form of the information-storage study (Basu et al.): the question gets "?" and a suffix.
CONSTRAINT_TEMPLATE = "<image>\nUSER: {question}? Answer in a few words.\nASSISTANT:"

ALIASES = {"main_entity": "constraint", "bbox": "box", "image_path": "image", "img": "image"}
REQUIRED = ("image", "question", "answer")


@dataclass
class Example:
    """One example: an image (a path or a PIL image), a question, an answer, optional constraint and box."""

    image: Any
    question: str
    answer: str
    constraint: Optional[str] = None
    box: Optional[tuple[float, float, float, float]] = None
    id: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def load_image(self):
        from mm_lens.inputs import load_image

        return load_image(self.image)

    def prompt(self, template: str = LLAVA_TEMPLATE, image_token: str = "<image>") -> str:
        question = self.question.rstrip(" ?") if "{question}?" in template else self.question
        return template.replace("<image>", image_token).format(question=question)

    def to_inputs(self, model, template: str = LLAVA_TEMPLATE, with_answer: bool = False):
        """A one-row :class:`MultimodalInput` with ``meta`` filled for the position groups:
        ``question`` (the ``"question"`` group), ``box`` (``"object"``/``"non_object"``),
        ``constraint`` and ``answer`` (appended to the prompt when ``with_answer``, for
        teacher-forced losses such as :func:`mm_lens.analysis.visual_token_budget`)."""
        prompt = self.prompt(template, model.image_token)
        if with_answer:
            prompt = f"{prompt} {self.answer}"
        inputs = model.to_inputs(self.load_image(), prompt)
        question = self.question.rstrip(" ?") if "{question}?" in template else self.question
        inputs.meta.update(question=question, answer=self.answer if with_answer else None, constraint=self.constraint)
        if self.box is not None:
            inputs.meta["box"] = list(self.box)
        inputs.meta["id"] = self.id
        return inputs

    def to_dict(self, image_root: Optional[str] = None) -> dict:
        image = self.image
        if isinstance(image, str) and image_root is not None:
            image = os.path.relpath(image, image_root)
        out = {"image": image, "question": self.question, "answer": self.answer}
        if self.constraint is not None:
            out["constraint"] = self.constraint
        if self.box is not None:
            out["box"] = list(self.box)
        if self.id is not None:
            out["id"] = self.id
        return {**out, **self.extra}


def from_record(record: dict, image_dir: Optional[str] = None, box_format: str = "xyxy", where: str = "") -> Example:
    """An :class:`Example` from one row (a dict with the columns of the format)."""
    row = {ALIASES.get(k, k): v for k, v in dict(record).items()}
    missing = [k for k in REQUIRED if row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}row is missing {missing}: every row needs 'image', 'question' and 'answer' "
                         f"(got columns {sorted(record)})")
    image = row.pop("image")
    if isinstance(image, str) and image_dir is not None and not os.path.isabs(image):
        image = os.path.join(image_dir, image)
    box = row.pop("box", None)
    if box is not None:
        box = _box(box, box_format, where)
    known = {"question", "answer", "constraint", "id"}
    extra = {k: v for k, v in row.items() if k not in known}
    ident = row.get("id")
    return Example(image, str(row["question"]), str(row["answer"]), row.get("constraint") or None, box,
                   None if ident is None else str(ident), extra)


def load_jsonl(path: str, image_dir: Optional[str] = None, box_format: str = "xyxy") -> list[Example]:
    """Read a JSONL file; image paths are relative to ``image_dir`` (default: the file's folder)."""
    if not os.path.exists(path):
        raise ValueError(f"no such file {path!r}: pass the path of the .jsonl file")
    root = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON ({e.msg}): one JSON object per line") from None
            examples.append(from_record(record, root, box_format, where=f"{path}:{i}: "))
    return examples


def save_jsonl(examples: Sequence[Example], path: str, image_dir: Optional[str] = None) -> None:
    """Write examples as JSONL; PIL images are saved as PNG files under ``image_dir`` (default ``images/``)."""
    root = os.path.dirname(os.path.abspath(path))
    image_dir = image_dir or os.path.join(root, "images")
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            if not isinstance(ex.image, str):
                os.makedirs(image_dir, exist_ok=True)
                name = os.path.join(image_dir, f"{ex.id or i}.png")
                ex.load_image().save(name)
                ex = Example(name, ex.question, ex.answer, ex.constraint, ex.box, ex.id, ex.extra)
            f.write(json.dumps(ex.to_dict(image_root=root)) + "\n")


def load_hf(dataset: Union[str, Iterable[dict]], split: str = "train", image_dir: Optional[str] = None,
            box_format: str = "xyxy", columns: Optional[dict] = None, **load_kwargs) -> list[Example]:
    """Examples from a Hugging Face ``datasets`` dataset (a loaded one, any iterable of dicts, or a
    name/path given to ``datasets.load_dataset``) with the columns of the format.

    ``columns`` renames columns first, e.g. ``{"img": "image", "entity": "constraint"}``; image
    columns may hold PIL images or paths.
    """
    if isinstance(dataset, str):
        try:
            import datasets
        except ImportError:
            raise ValueError("loading a dataset by name needs the `datasets` package: pip install datasets "
                             "(or pass the rows yourself, or use load_jsonl)") from None
        dataset = datasets.load_dataset(dataset, split=split, **load_kwargs)
    columns = columns or {}
    return [from_record({columns.get(k, k): v for k, v in dict(row).items()}, image_dir, box_format, where=f"row {i}: ")
            for i, row in enumerate(dataset)]


def to_inputs(model, examples: Sequence[Example], template: str = LLAVA_TEMPLATE, with_answer: bool = False) -> list:
    """One :class:`MultimodalInput` per example (see :meth:`Example.to_inputs`)."""
    return [ex.to_inputs(model, template, with_answer) for ex in examples]


def _box(box, box_format: str, where: str) -> tuple[float, float, float, float]:
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    if len(box) != 4:
        raise ValueError(f"{where}box must have 4 numbers ([x0, y0, x1, y1]), got {box!r}")
    x0, y0, a, b = (float(v) for v in box)
    return (x0, y0, x0 + a, y0 + b) if box_format == "xywh" else (x0, y0, a, b)
