"""An SAE feature read on the picture: its activation over the image grid, and its top image patches.

:func:`feature_acts` runs the model up to the SAE's hook and encodes the activation there with the SAE
(the SAE need not be spliced in); :func:`feature_grid` lays one image's values on its patch grid;
:func:`top_patches` finds the image patches of a dataset where the feature is largest, with their crops
(figures and the HTML dashboard: :mod:`mm_lens.viz.sae`).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from mm_lens.data import LLAVA_TEMPLATE
from mm_lens.inputs import MultimodalInput
from mm_lens.sae.names import resolve_hook_name
from mm_lens.sae.training import _forward_batches, _stop_layer


@torch.no_grad()
def feature_acts(model, sae, inputs: MultimodalInput, feature: int) -> Float[Tensor, "batch pos"]:
    """Feature ``feature`` of ``sae`` at every position, ``[batch, pos]`` (language-model hooks) or
    ``[n_images, tokens]`` (vision-tower and projector hooks)."""
    return _encoded(model, sae, inputs)[..., _check_feature(sae, feature)]


def _check_feature(sae, feature: int) -> int:
    if not 0 <= int(feature) < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is outside 0..{sae.cfg.d_sae - 1} (the SAE has d_sae={sae.cfg.d_sae})")
    return int(feature)


def _encoded(model, sae, inputs: MultimodalInput) -> Tensor:
    """Every feature at every position: the SAE's encoding of the activation at its hook (where an SAE is
    spliced in, what the splice receives)."""
    hook = resolve_hook_name(model, sae.cfg.metadata.hook_name)
    stop = _stop_layer(model, hook)
    module = model.get_submodule(hook)
    if isinstance(module, HookPoint):
        acts = model.run_with_cache(inputs, names_filter=[hook], stop_at_layer=stop, return_cache_object=False)[1][hook]
    else:
        seen = {}
        handle = module.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        try:
            model(inputs, stop_at_layer=stop)
        finally:
            handle.remove()
        acts = seen["x"]
    acts = acts.flatten(2) if acts.ndim > 3 else acts
    return sae.encode(acts.to(sae.W_dec.device))


def feature_grid(model, values: Tensor, inputs: MultimodalInput, hook_name: str, row: int = 0, image: int = 0
                 ) -> Float[Tensor, "rows cols"]:
    """One image's values ``[rows, cols]`` on its patch grid, from :func:`feature_acts`' output."""
    rp = inputs.positions[row]
    rows, cols = rp.grid_shape
    if hook_name.startswith(("vision_encoder.", "vision_projector.")):
        index = sum(len(inputs.positions[r].images) for r in range(row)) + image
        tokens = values[index]
        return tokens[-rows * cols:].reshape(rows, cols)  # a class token, if any, comes first
    if image >= len(rp.images):
        raise ValueError(f"row {row} has {len(rp.images)} image(s); no image {image}")
    return values[row, rp.images[image].to(values.device)[-rows * cols:]].reshape(rows, cols)


@dataclass
class TopPatch:
    """One image patch where the feature is large."""

    activation: float
    example: int  # index into the dataset
    row: int  # patch row and column on the image's grid
    col: int
    crop: np.ndarray = field(repr=False)  # [h, w, 3] uint8: the patch with one patch of context, as the model sees it
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the patch inside ``crop`` (x0, y0, x1, y1), pixels
    prompt: str = ""


@dataclass
class TopPatches:
    """The top image patches of one feature over a dataset, largest first, and how often it is active."""

    feature: int
    hook_name: str
    patches: list[TopPatch]
    n_patches: int  # image patches seen
    n_active: int  # of which the feature is > 0
    max_activation: float


@torch.no_grad()
def top_patches(model, sae, dataset: Iterable, feature: int, k: int = 16, examples_per_forward: int = 8,
                template: str = LLAVA_TEMPLATE, context: int = 1) -> TopPatches:
    """The ``k`` image patches of ``dataset`` (examples, ``(image, prompt)`` pairs or MultimodalInputs, as
    :func:`mm_lens.sae.training`) where feature ``feature`` is largest, each cropped from the image as
    the model sees it (resized and cropped by the processor; the base view for LLaVA-NeXT) with ``context``
    patches around it."""
    from mm_lens.viz.tracing import input_image

    feature = _check_feature(sae, feature)
    hook = resolve_hook_name(model, sae.cfg.metadata.hook_name)
    heap: list = []  # (activation, order, TopPatch) of the k largest so far
    order = itertools.count()
    seen = active = n = 0
    for inputs, count in _forward_batches(model, dataset, examples_per_forward, template):
        values = _encoded(model, sae, inputs)[..., feature].float().cpu()
        for row in range(inputs.shape[0]):
            for image in range(len(inputs.positions[row].images)):
                grid = feature_grid(model, values, inputs, hook, row, image)
                seen += grid.numel()
                active += int((grid > 0).sum())
                index = sum(len(inputs.positions[r].images) for r in range(row)) + image
                picture = None
                for (r, c), value in np.ndenumerate(grid.numpy()):
                    if len(heap) == k and value <= heap[0][0]:
                        continue
                    picture = picture if picture is not None else np.asarray(input_image(model, inputs, index))
                    patch = _crop(picture, grid.shape, r, c, context)
                    entry = (float(value), next(order), TopPatch(float(value), n + row, r, c, *patch,
                                                      prompt=inputs.positions[row].prompt))
                    heapq.heappush(heap, entry) if len(heap) < k else heapq.heapreplace(heap, entry)
        n += count
    if seen == 0:
        raise ValueError("the dataset has no image patches")
    patches = [e[2] for e in sorted(heap, key=lambda e: (-e[0], e[1]))]
    return TopPatches(feature, hook, patches, seen, active, patches[0].activation if patches else 0.0)


def _crop(picture: np.ndarray, grid: Any, r: int, c: int, context: int) -> tuple[np.ndarray, tuple]:
    """Patch (r, c) of ``picture`` with ``context`` patches around it, and where the patch sits in the crop."""
    rows, cols = grid
    ph, pw = picture.shape[0] // rows, picture.shape[1] // cols
    r0, c0 = max(r - context, 0), max(c - context, 0)
    r1, c1 = min(r + context + 1, rows), min(c + context + 1, cols)
    crop = picture[r0 * ph:r1 * ph, c0 * pw:c1 * pw]
    y, x = (r - r0) * ph, (c - c0) * pw
    return crop.copy(), (x, y, x + pw, y + ph)
