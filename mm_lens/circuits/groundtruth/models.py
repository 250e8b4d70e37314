"""The ground-truth suite: small VLMs whose mechanism is fixed by construction, each with its clean and
corrupted input, its metric, its position groups and its true edge set (in :mod:`mm_lens.circuits.graph`'s
naming). Every edge outside the true set has no effect when patched (the corruption keeps every norm),
so a localisation method is scored by how well it recovers exactly these edges.

* ``copy_head``: layer 1 head 0 attends from the last position to the coloured object patch and copies
  its colour into the answer.
* ``route``: object patch -> question token -> last position: layer 0 head 0 copies the object's colour
  into the question's subject word, layer 1 head 2 copies it from there to the last position.
* ``storage``: the answer is stored in layer 0's MLP at the constraint word (a "fact": circle -> red,
  square -> blue) and moved to the last position by layer 1 head 0 (the storage-and-transfer finding
  of Basu et al., NeurIPS 2024); the corruption changes the word, the image stays.
* ``distractor``: two coloured patches change between the runs; head 0 of layer 1 copies the object's
  colour into the answer, head 2 copies the distractor's into a subspace nothing reads (a decoy:
  it moves information, but not to the answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mm_lens.analysis import groups
from mm_lens.circuits.groundtruth.build import (
    DISTRACTOR,
    OBJECT,
    QUERY,
    SUBJECT,
    A,
    B,
    copy_head,
    directions,
    lookup_mlp,
    mark_token,
    silent,
)
from mm_lens.circuits.groundtruth.scenes import box, install_encoder, scene
from mm_lens.inputs import MultimodalInput

PROMPT = "USER: <image>\nwhat is the color of the {subject} ? ASSISTANT:"
QUESTION = "what is the color of the {subject} ?"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
LOGIT_GAIN = 3.0


@dataclass
class GroundTruth:
    """A model with a known mechanism: ``true_edges`` carry the whole difference between ``clean`` and
    ``corrupted`` under ``metric`` (logit of the clean answer minus that of the corrupted one)."""

    name: str
    description: str
    model: object
    clean: MultimodalInput
    corrupted: MultimodalInput
    metric: Callable
    positions: list
    true_edges: list[str]
    answer: str
    corrupted_answer: str
    notes: dict = field(default_factory=dict)


def logit_difference(model, answer: str, other: str) -> Callable:
    a, b = model.to_single_token(answer), model.to_single_token(other)
    return lambda logits: logits[:, -1, a] - logits[:, -1, b]


@torch.no_grad()
def _base(seed: int, subject: str = "circle"):
    """A silent tiny LLaVA (3 layers, 4 heads on 2 key/value heads, 4 x 4 patches) with colour payloads in
    subspace A, markers on the last token and the subject word, and an unembedding that reads A."""
    model = silent(seed, text_layers=3, vision_layers=1)
    payloads = dict(zip(COLOURS, directions(len(COLOURS), A, seed)))
    mark_token(model, "ASSISTANT:", QUERY)
    for word in ("circle", "square", "triangle", "star"):
        mark_token(model, word, SUBJECT)
    for colour, p in payloads.items():
        model.unembed.W_U[:, model.to_single_token(colour)] = p * LOGIT_GAIN
    return model, payloads


def _inputs(model, picture, subject: str, meta: dict) -> MultimodalInput:
    inputs = model.to_inputs(picture, PROMPT.format(subject=subject))
    inputs.meta.update(question=QUESTION.format(subject=subject), **meta)
    return inputs


def _palette(payloads: dict, markers: dict) -> dict:
    return {colour: (marker, payloads[colour]) for colour, marker in markers.items()}


def copy_head_model(seed: int = 0) -> GroundTruth:
    model, payloads = _base(seed)
    install_encoder(model, _palette(payloads, {c: OBJECT for c in ("red", "green", "blue", "yellow")}), seed)
    copy_head(model, 1, 0, QUERY, OBJECT, A, A)
    where = (2, 1)
    clean = _inputs(model, scene({where: "red"}, seed), "circle", dict(box=box(*where)))
    corrupted = _inputs(model, scene({where: "blue"}, seed), "circle", dict(box=box(*where)))
    return GroundTruth("copy_head", "one head copies the object patch's colour to the last position", model, clean,
                       corrupted, logit_difference(model, "red", "blue"), ["last", "object", "non_object", "question"],
                       ["input@object->L1H0@last.v", "L1H0@last->logits@last"], "red", "blue")


def route_model(seed: int = 1) -> GroundTruth:
    model, payloads = _base(seed)
    install_encoder(model, _palette(payloads, {c: OBJECT for c in ("red", "green", "blue", "yellow")}), seed)
    copy_head(model, 0, 0, SUBJECT, OBJECT, A, B)  # the subject word reads the object's colour
    copy_head(model, 1, 2, QUERY, SUBJECT, B, A)  # the last position reads it from the subject word
    where = (1, 2)
    clean = _inputs(model, scene({where: "green"}, seed), "circle", dict(box=box(*where)))
    corrupted = _inputs(model, scene({where: "yellow"}, seed), "circle", dict(box=box(*where)))
    positions = ["last", "object", "non_object", ("subject", groups.question("circle")), "question"]
    return GroundTruth("route", "object patch -> question word (L0H0) -> last position (L1H2)", model, clean, corrupted,
                       logit_difference(model, "green", "yellow"), positions,
                       ["input@object->L0H0@subject.v", "L0H0@subject->L1H2@last.v", "L1H2@last->logits@last"],
                       "green", "yellow")


def storage_model(seed: int = 2) -> GroundTruth:
    model, payloads = _base(seed)
    install_encoder(model, {}, seed)
    facts = {"circle": "red", "square": "blue", "triangle": "green", "star": "yellow"}
    keys = [B.start + i for i in range(len(facts))]
    for word, dim in zip(facts, keys):
        mark_token(model, word, dim)  # the word's identity
    lookup_mlp(model, 0, keys, [payloads[c] for c in facts.values()])
    copy_head(model, 1, 0, QUERY, SUBJECT, A, A)  # the last position reads the stored answer at the word
    picture = scene({}, seed)
    clean = _inputs(model, picture, "circle", {})
    corrupted = _inputs(model, picture, "square", {})
    _calibrate(model, clean, 0)
    positions = ["last", ("subject", groups.question("circle")), "image", "question"]
    return GroundTruth("storage", "answer stored by mlp0 at the constraint word, moved to the last position by L1H0",
                       model, clean, corrupted, logit_difference(model, "red", "blue"), positions,
                       ["input@subject->mlp0@subject", "mlp0@subject->L1H0@last.v", "L1H0@last->logits@last"],
                       "red", "blue")


def distractor_model(seed: int = 3) -> GroundTruth:
    model, payloads = _base(seed)
    markers = {**{c: OBJECT for c in ("red", "green", "blue", "yellow")}, "purple": DISTRACTOR, "orange": DISTRACTOR}
    install_encoder(model, _palette(payloads, markers), seed)
    copy_head(model, 1, 0, QUERY, OBJECT, A, A)  # the answer
    copy_head(model, 1, 2, QUERY, DISTRACTOR, A, B)  # the decoy: moves the distractor's colour where nothing reads
    obj, other = (0, 1), (3, 2)
    clean = _inputs(model, scene({obj: "red", other: "purple"}, seed), "circle", dict(box=box(*obj)))
    corrupted = _inputs(model, scene({obj: "green", other: "orange"}, seed), "circle", dict(box=box(*obj)))
    positions = ["last", "object", ("distractor", groups.object_patches(box(*other))), "image", "question"]
    return GroundTruth("distractor", "L1H0 copies the object's colour; L1H2 moves the distractor's where nothing reads",
                       model, clean, corrupted, logit_difference(model, "red", "green"), positions,
                       ["input@object->L1H0@last.v", "L1H0@last->logits@last"], "red", "green")


@torch.no_grad()
def _calibrate(model, inputs: MultimodalInput, layer: int, norm: float = 3.0) -> None:
    """Scale MLP ``layer``'s output so that its largest write on ``inputs`` has norm ``norm``."""
    _, cache = model.run_with_cache(inputs, names_filter=f"blocks.{layer}.hook_mlp_out")
    top = float(cache[f"blocks.{layer}.hook_mlp_out"].norm(dim=-1).max())
    model.blocks[layer].mlp.W_out.mul_(norm / top)


SUITE = {"copy_head": copy_head_model, "route": route_model, "storage": storage_model, "distractor": distractor_model}


def load(name: str) -> GroundTruth:
    """One model of the suite by name (:data:`SUITE`)."""
    if name not in SUITE:
        raise ValueError(f"unknown ground-truth model {name!r}; choose from {list(SUITE)}")
    return SUITE[name]()
