"""Clean/corrupted pairs and metrics for the patching methods of a study, built per example.

``corruption`` (a name, or a dict with ``kind`` and its parameters):

* ``"replace"``: each token of ``span`` (``"constraint"``, the example's constraint, by default;
  ``"question"``; or any substring of the prompt) becomes ``token`` (default the tokenizer's unk, pad
  or eos token), keeping the length (Basu et al.);
* ``"embedding_noise"``: ``k`` x std Gaussian noise on the embeddings of ``group`` (``"image"``
  by default; ROME uses ``k=3``), drawn with ``seed``;
* ``"blank_image"`` (``value``: normalised pixel value, 0 = the mean colour), ``"pixel_noise"``
  (``std``, ``seed``), ``"mask_object"`` (the example's box blanked or blurred: ``mode``),
  ``"other_image"`` (the image in the example's ``extra[column]``, default column ``"other_image"``).

``metric`` reads the last prompt position: ``"answer_logit"``, ``"answer_prob"``,
``"answer_logprob"`` of the clean run's top token, or ``"logit_diff"`` (that token's logit minus the
logit of the corrupted run's top token, the logit difference of TransformerLens/ARENA).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from mm_lens.analysis import corruptions, groups
from mm_lens.analysis.causal_trace import _replacement_token as replacement_token  # the same default token
from mm_lens.inputs import MultimodalInput

KINDS = ("replace", "embedding_noise", "blank_image", "pixel_noise", "mask_object", "other_image")
METRICS = ("answer_logit", "answer_prob", "answer_logprob", "logit_diff")


def parse(corruption: Union[str, dict, None]) -> dict:
    """The corruption as ``{"kind": ..., **params}``; a clear error when missing or unknown."""
    if corruption is None:
        raise ValueError(f"patching methods need corruption=...: one of {KINDS} (or a dict with 'kind' and its "
                         "parameters, e.g. {'kind': 'replace', 'span': 'constraint'})")
    spec = {"kind": corruption} if isinstance(corruption, str) else dict(corruption)
    if spec.get("kind") not in KINDS:
        raise ValueError(f"unknown corruption {spec.get('kind')!r}; use one of {KINDS}")
    return spec


def missing(example, corruption) -> Optional[str]:
    """Why ``example`` cannot be corrupted this way (it lacks a constraint, a box or another image), or None."""
    spec = parse(corruption)
    if spec["kind"] == "replace" and spec.get("span", "constraint") == "constraint" and not example.constraint:
        return "no constraint: the 'replace' corruption replaces the example's constraint span"
    if spec["kind"] == "mask_object" and example.box is None:
        return "no box: the 'mask_object' corruption blanks the example's object"
    if spec["kind"] == "other_image" and example.extra.get(spec.get("column", "other_image")) is None:
        return f"no {spec.get('column', 'other_image')!r}: the 'other_image' corruption needs the other image's path"
    return None


def corrupt(model, example, clean: MultimodalInput, corruption) -> tuple[MultimodalInput, list]:
    """``(corrupted inputs, corrupted_hooks)`` for ``clean`` (the hooks are empty except for embedding noise)."""
    spec = parse(corruption)
    kind = spec.pop("kind")
    if kind == "replace":
        span = spec.get("span", "constraint")
        text = {"constraint": example.constraint, "question": clean.meta.get("question")}.get(span, span)
        pos = groups.resolve(model, clean, groups.question(text))
        return corruptions.replace_tokens(clean, pos, replacement_token(model, spec.get("token"))), []
    if kind == "embedding_noise":
        hook = corruptions.embedding_noise_hook(model, clean, spec.get("group", "image"), k=spec.get("k", 3.0),
                                                seed=spec.get("seed", 0), std=spec.get("std"))
        return clean, [hook]
    if kind == "blank_image":
        return corruptions.blank_image(clean, spec.get("value", 0.0)), []
    if kind == "pixel_noise":
        return corruptions.pixel_noise(clean, spec.get("std", 1.0), spec.get("seed", 0)), []
    if kind == "mask_object":
        return corruptions.mask_region(model, clean, example.box, mode=spec.get("mode", "mean")), []
    from mm_lens.inputs import load_image

    return corruptions.other_image(model, clean, [load_image(example.extra[spec.get("column", "other_image")])]), []


def metric(model, name: str, answer: int, corrupted: MultimodalInput, hooks: list) -> Callable[[Tensor], Tensor]:
    """``metric(logits [batch, 1 or pos, d_vocab]) -> [batch]`` read at the last position."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; use one of {METRICS}")
    wrong = None
    if name == "logit_diff":
        with model.hooks(fwd_hooks=hooks):
            logits = model(corrupted)
        wrong = int(logits[0, corrupted.positions.last].argmax())
        if wrong == answer:
            raise ValueError("the corrupted run predicts the clean answer too, so the logit difference has no wrong "
                             "answer: use a stronger corruption or metric='answer_logit'")

    def fn(logits: Tensor) -> Tensor:
        last = logits[:, -1].float()
        if name == "answer_logit":
            return last[:, answer]
        if name == "answer_prob":
            return last.softmax(-1)[:, answer]
        if name == "answer_logprob":
            return last.log_softmax(-1)[:, answer]
        return last[:, answer] - last[:, wrong]

    return fn


@torch.no_grad()
def patch_args(model, example, inputs: MultimodalInput, ctx: dict, corruption, metric_name: str) -> dict:
    """Keyword arguments shared by the patching methods: ``clean``, ``corrupted``, ``metric``, ``corrupted_hooks``."""
    corrupted, hooks = corrupt(model, example, inputs, corruption)
    return dict(clean=inputs, corrupted=corrupted, corrupted_hooks=hooks,
                metric=metric(model, metric_name, ctx["predicted"], corrupted, hooks))
