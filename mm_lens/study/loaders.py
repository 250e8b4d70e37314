"""Datasets for a study: every source becomes a list of :class:`mm_lens.data.Example` with unique ids.

* the JSONL format of :mod:`mm_lens.data` (``questions.jsonl`` + an image folder);
* a Hugging Face ``datasets`` dataset (a loaded one, a folder written by ``save_to_disk``, or
  ``"hf:<name>"`` given to ``datasets.load_dataset``) with the same columns;
* the GQA layout: a questions JSON (``{question_id: {"imageId", "question", "answer", "annotations",
  "types", ...}}``), the scene graphs JSON (``{image_id: {"width", "height", "objects": {object_id:
  {"name", "x", "y", "w", "h"}}}}``) and the image folder (``{image_id}.jpg``). The box of an example
  encloses the objects its question refers to (``annotations["question"]``), so the ``object`` and
  ``non_object`` position groups of the cross-modal information-flow study work;
* the VQA-Constraints CSVs of the information-storage study: a ``question``, an ``answer`` and the
  constraint column ``main_entity``; images from a local folder (``image_template`` builds a file name
  from the row when the CSV holds only an image id).

Ids: a row's own ``id`` (GQA: the question id) or, without one, its index in the source; ids must be
unique, since the results of a study are keyed by them.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

from mm_lens import data
from mm_lens.data import Example

FORMATS = ("jsonl", "hf", "gqa", "vqa_constraints")
IMAGE_COLUMNS = ("image", "image_path", "img", "image_file", "file_name", "filename", "image_id", "imageId")


def load_dataset(source: Any, format: Optional[str] = None, *, image_dir: Optional[str] = None,
                 scene_graphs: Optional[str] = None, split: str = "train", limit: Optional[int] = None,
                 **kwargs) -> list[Example]:
    """Examples from a file, a folder, a Hugging Face dataset or a list (see the module docstring).

    ``format`` is inferred when omitted: ``.jsonl`` -> JSONL, ``.csv`` -> VQA-Constraints, ``.json``
    with ``scene_graphs`` -> GQA, ``"hf:<name>"`` or a ``save_to_disk`` folder -> Hugging Face.
    A list may hold :class:`~mm_lens.data.Example`, dicts with the columns of the JSONL format, or
    objects with ``image``/``question``/``answer`` attributes (e.g. :func:`mm_lens.toy.data.make_examples`).
    ``limit`` keeps the first ``limit`` examples. Other keyword arguments go to the format's reader.
    """
    fmt = format or _infer_format(source, scene_graphs)
    if fmt == "jsonl":
        examples = data.load_jsonl(str(source), image_dir=image_dir, **kwargs)
    elif fmt == "hf":
        examples = _load_hf(source, split, image_dir, **kwargs)
    elif fmt == "gqa":
        if scene_graphs is None:
            raise ValueError("the GQA layout needs scene_graphs=<scene graphs JSON> (the object boxes) and "
                             "image_dir=<image folder>")
        examples = load_gqa(str(source), scene_graphs, image_dir, **kwargs)
    elif fmt == "vqa_constraints":
        examples = load_vqa_constraints(str(source), image_dir, **kwargs)
    elif fmt == "list":
        examples = [as_example(x, i) for i, x in enumerate(source)]
    else:
        raise ValueError(f"unknown dataset format {format!r}; use one of {FORMATS}")
    return with_ids(examples[:limit] if limit is not None else examples)


def _infer_format(source: Any, scene_graphs: Optional[str]) -> str:
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if path.startswith("hf:"):
            return "hf"
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json",
                                                                                       "dataset_dict.json")):
            return "hf"
        if not os.path.exists(path):
            raise ValueError(f"no such file {path!r}: pass a .jsonl file, a VQA-Constraints .csv, a GQA questions "
                             ".json (with scene_graphs=...), a datasets folder, or 'hf:<dataset name>'")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            return "jsonl"
        if ext == ".csv":
            return "vqa_constraints"
        if ext == ".json" and scene_graphs is not None:
            return "gqa"
        raise ValueError(f"cannot tell the format of {path!r}: pass format= one of {FORMATS} (a GQA questions "
                         "file also needs scene_graphs=...)")
    if type(source).__module__.startswith("datasets"):
        return "hf"
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes, dict)):
        return "list"
    raise TypeError(f"a dataset is a path, a Hugging Face dataset or a list of examples, got {type(source).__name__}")


def _load_hf(source: Any, split: str, image_dir: Optional[str], **kwargs) -> list[Example]:
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if path.startswith("hf:"):
            return data.load_hf(path[3:], split=split, image_dir=image_dir, **kwargs)
        import datasets

        loaded = datasets.load_from_disk(path)
        source = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return data.load_hf(source, image_dir=image_dir, **kwargs)


def as_example(item: Any, index: int) -> Example:
    """One :class:`Example` from an Example, a dict row, or an object with image/question/answer attributes."""
    if isinstance(item, Example):
        return item
    if isinstance(item, dict):
        return data.from_record(item, where=f"example {index}: ")
    missing = [a for a in ("image", "question", "answer") if not hasattr(item, a)]
    if missing:
        raise TypeError(f"example {index} ({type(item).__name__}) has no {missing}: pass mm_lens.data.Example, dicts "
                        "or objects with image, question and answer")
    extra = {k: getattr(item, k) for k in ("kind",) if hasattr(item, k)}
    box = getattr(item, "box", None)
    return Example(item.image, str(item.question), str(item.answer), getattr(item, "constraint", None),
                   None if box is None else tuple(float(v) for v in box), getattr(item, "id", None), extra)


def with_ids(examples: Sequence[Example]) -> list[Example]:
    """The examples with ``id`` set (their index when missing); raises on duplicate ids."""
    out = []
    for i, ex in enumerate(examples):
        if ex.id is None:
            ex = Example(ex.image, ex.question, ex.answer, ex.constraint, ex.box, str(i), ex.extra)
        out.append(ex)
    dupes = sorted(i for i, n in Counter(ex.id for ex in out).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate example ids {dupes[:10]}: results are keyed by id, so every example needs its own")
    return out


# ---------------------------------------------------------------- GQA
def load_gqa(questions: str, scene_graphs: str, image_dir: Optional[str] = None, types: Optional[Sequence[str]] = None,
             image_ext: str = ".jpg") -> list[Example]:
    """Examples from GQA's questions JSON and scene graphs JSON (see the module docstring).

    ``types``: keep the questions whose ``types`` (structural, semantic or detailed, e.g. ``"chooseAttr"``)
    include one of these. The box encloses the objects the question refers to, clipped to the image;
    questions without such an object have no box (the object groups then cannot be resolved for them).
    ``extra`` keeps ``image_id``, the object ids and their boxes, ``full_answer`` and the types.
    """
    qs = _read_json(questions, "GQA questions")
    graphs = _read_json(scene_graphs, "GQA scene graphs")
    image_dir = image_dir if image_dir is not None else os.path.join(os.path.dirname(os.path.abspath(questions)), "images")
    wanted = set(types) if types else None
    out = []
    for qid, q in qs.items():
        kinds = {f"type_{k}": v for k, v in (q.get("types") or {}).items()}
        if wanted is not None and not wanted & set(kinds.values()):
            continue
        image_id = str(q["imageId"])
        graph = graphs.get(image_id)
        if graph is None:
            raise ValueError(f"GQA question {qid}: image {image_id} has no scene graph in {scene_graphs}")
        ids = [str(o) for o in (q.get("annotations") or {}).get("question", {}).values()]
        boxes = [_gqa_box(graph, o, qid) for o in dict.fromkeys(ids)]
        box = None if not boxes else (min(b[0] for b in boxes), min(b[1] for b in boxes),
                                      max(b[2] for b in boxes), max(b[3] for b in boxes))
        extra = {"image_id": image_id, "object_ids": list(dict.fromkeys(ids)), "boxes": [list(b) for b in boxes],
                 "full_answer": q.get("fullAnswer"), **kinds}
        out.append(Example(os.path.join(image_dir, image_id + image_ext), q["question"], q["answer"], None, box,
                           str(qid), extra))
    return out


def _gqa_box(graph: dict, object_id: str, qid: str) -> tuple[float, float, float, float]:
    obj = graph.get("objects", {}).get(object_id)
    if obj is None:
        raise ValueError(f"GQA question {qid} refers to object {object_id}, which its scene graph does not have")
    w, h = float(graph["width"]), float(graph["height"])
    x0, y0 = max(0.0, float(obj["x"])), max(0.0, float(obj["y"]))
    return (x0, y0, min(w, float(obj["x"]) + float(obj["w"])), min(h, float(obj["y"]) + float(obj["h"])))


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"no such file {path!r} ({what})")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}") from None


# ---------------------------------------------------------------- VQA-Constraints
def load_vqa_constraints(path: str, image_dir: Optional[str] = None, image_template: Optional[str] = None,
                         columns: Optional[dict] = None) -> list[Example]:
    """Examples from a VQA-Constraints CSV: ``question``, ``answer``, ``main_entity`` (the constraint) and an
    image column (``image``, ``image_path``, ``file_name`` or ``image_id``), relative to ``image_dir``
    (default: the CSV's folder). ``image_template`` (e.g. ``"COCO_val2014_{image_id:0>12}.jpg"``) builds
    the file name from the row instead; ``columns`` renames columns first (e.g. ``{"entity": "main_entity"}``).
    Every other column is kept in ``extra``.
    """
    if not os.path.exists(path):
        raise ValueError(f"no such file {path!r}: pass the VQA-Constraints .csv")
    root = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
    columns = columns or {}
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), 2):
            row = {columns.get(k, k): v for k, v in row.items() if k is not None}
            where = f"{path}:{i}: "
            if "main_entity" not in row and "constraint" not in row:
                raise ValueError(f"{where}no 'main_entity' column (the constraint span); got {sorted(row)} — "
                                 "rename with columns={...}")
            if image_template is not None:
                try:
                    row["image"] = image_template.format(**row)
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{where}image_template {image_template!r} does not fit the row: {e}") from None
            else:
                key = next((c for c in IMAGE_COLUMNS if row.get(c)), None)
                if key is None:
                    raise ValueError(f"{where}no image column (one of {IMAGE_COLUMNS}); pass image_template=...")
                row["image"] = row.pop(key)
            out.append(data.from_record(row, root, where=where))
    return out
