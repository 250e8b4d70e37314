"""Gemma 3's images (SigLIP + a pooled projector): ``tokens_per_side`` x ``tokens_per_side`` soft tokens per crop, a
thumbnail and, with the processor's ``do_pan_and_scan=True``, crops of a wide (tall) image in a row (column) after
it, each between its own start/end markers (:func:`mm_lens.components.tiling.crops_layout`).

:class:`PanAndScanPipeline` is the family's image pipeline (:mod:`mm_lens.components.pipeline`, on the cropped-image
machinery of :mod:`mm_lens.components.cropped`); it holds no module of its own: the tower's output (post-norm
included) goes through the projector crop by crop, and the crops fill their positions in order.
"""

from __future__ import annotations

from typing import Sequence

from jaxtyping import Float
from torch import Tensor

from mm_lens.components.cropped import CroppedPipeline
from mm_lens.components.tiling import AnyresLayout, crops_layout


class PanAndScanPipeline(CroppedPipeline):
    """Gemma 3's image pipeline (the module docstring)."""

    grouped = True  # the processor reads the images of each prompt together

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokens_per_side = cfg.projector.tokens_per_side
        self.pool = cfg.vision.grid_size // self.tokens_per_side

    def row_layouts(self, model, groups: list[list], enc) -> list[AnyresLayout]:
        """From the processor's replacement strings: one thumbnail plus as many crops as markers it added."""
        replacements = [r for row in enc["text_replacement_offsets"] for r in row if r["type"] == "image"]
        images = [i for g in groups for i in g]
        out = []
        for im, r in zip(images, replacements):
            n = r["replacement"].count(r["text"]) - 1  # the placeholder is the start marker of each crop
            out.append(crops_layout(self.tokens_per_side, self.pool, (n, 1) if im.height > im.width else (1, n)))
        return out

    def features(self, model, pixel_values: Float[Tensor, "n_crops C H W"], image_sizes: Sequence = ()
                 ) -> Float[Tensor, "n_crops tokens d_model"]:
        """Every crop's soft tokens (crops in order fill the image positions in order)."""
        hidden = model.vision_encoder(pixel_values.to(model.vision_encoder.W_pos.device))
        # contiguous (the tower's output is laid out channels first): the pooled norm then sums in Hugging Face's order
        return model.vision_projector(hidden.contiguous().to(model.vision_projector.W_in.device))

    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        """The whole tower (its post-norm included) and the pooled projector on every crop."""
        out = self.tower_shapes(model, inputs)
        n, vision = self.n_crops(model, inputs), self.vision
        out["vision_encoder.ln_post.hook_scale"] = (n, vision.n_ctx, 1)
        out["vision_encoder.ln_post.hook_normalized"] = (n, vision.n_ctx, vision.d_model)
        return out
