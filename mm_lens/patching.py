"""The patching toolkit in one place: activation, path and attribution patching, attention knockout.

Example::

    from mm_lens import patching, viz
    clean = model.to_inputs(image, prompt)
    corrupted = clean.with_pixel_values(other_pixels)            # both runs carry an image
    metric = lambda logits: logits[:, -1, yes] - logits[:, -1, no]
    res = patching.activation_patch(model, clean, corrupted, metric)             # ("layer", "pos")
    viz.layer_position_heatmap(res, clean, model)                                # image positions collapsed
    ko = patching.knockout_edges(model, clean, patching.PAPER_EDGES, window=9)   # ("edge", "layer")
    viz.knockout_curves(ko)
"""

from mm_lens.analysis.attribution import attribution_patch
from mm_lens.analysis.knockout import PAPER_EDGES, attention_knockout, knockout_edges, knockout_hooks
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch
from mm_lens.analysis.results import PatchResult

__all__ = ["activation_patch", "path_patch", "attribution_patch", "attention_knockout", "knockout_edges",
           "knockout_hooks", "PAPER_EDGES", "PatchResult"]
