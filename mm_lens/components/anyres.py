"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision images: tiles with unpadding, OneVision's ``anyres_max_N`` reduction
and multi-image mode (the geometry: :mod:`mm_lens.components.tiling`).

:class:`AnyresPipeline` is the family's image pipeline (:mod:`mm_lens.components.pipeline`, on the cropped-image
machinery of :mod:`mm_lens.components.cropped`): the processor tiles each image, every crop runs through LLaVA's
tower and projector, and the module :class:`Anyres` (registered on the model as ``anyres``: its
``image_newline`` parameter and the hooks ``anyres.hook_tiles`` / ``anyres.hook_packed``) packs the crops'
features into the image positions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.cropped import CroppedPipeline
from mm_lens.components.tiling import AnyresLayout, layout, n_tiles, single_layout


class Anyres(nn.Module):
    """Packs per-crop projected features of LLaVA-NeXT / OneVision images; holds ``image_newline``.

    ``max_tiles``: OneVision's ``anyres_max_N`` (None: no reduction, LLaVA-NeXT). ``multi_image``: OneVision's
    multi-image mode (an image that shares its prompt with others is not tiled)."""

    residual_writes = ("image_newline",)  # vectors written into the residual stream as they are (weight centring)

    def __init__(self, d_model: int, pinpoints, tile_size: int, patch_grid: int, max_tiles: Optional[int] = None,
                 multi_image: bool = False):
        super().__init__()
        self.pinpoints = [list(p) for p in pinpoints]
        self.tile_size, self.patch_grid = tile_size, patch_grid
        self.max_tiles, self.multi_image = max_tiles, multi_image
        self.image_newline = nn.Parameter(torch.zeros(d_model))  # written into the residual stream as is
        self.hook_tiles = HookPoint()  # [n_crops, g*g, d_model]: projected features of every crop (base first)
        self.hook_packed = HookPoint()  # [n_image_tokens_total, d_model]: what goes into the image positions

    def layout(self, image_hw: tuple[int, int], tiled: bool = True) -> AnyresLayout:
        if not tiled:
            return single_layout(self.patch_grid, newline=True)
        return layout(image_hw, self.pinpoints, self.tile_size, self.patch_grid, self.max_tiles)

    def n_crops(self, image_hw: tuple[int, int], tiled: bool = True) -> int:
        """Crops of an image of ``image_hw`` (height, width): the base image plus every tile."""
        return n_tiles(image_hw, self.pinpoints, self.tile_size) if tiled else 1

    def tiled(self, images_per_row: Optional[Sequence[int]], n_images: int) -> list[bool]:
        """Which images are tiled: all (LLaVA-NeXT), or those alone in their prompt (OneVision)."""
        if not self.multi_image or images_per_row is None:
            return [True] * n_images
        flags = [n == 1 for n in images_per_row for _ in range(n)]
        if len(flags) != n_images:
            raise ValueError(f"{n_images} images but the rows hold {sum(images_per_row)}: build inputs with to_inputs")
        return flags

    def crops(self, pixel_values: Float[Tensor, "n_images max_crops C H W"], sizes_hw: Sequence[tuple[int, int]],
              tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_crops C H W"]:
        """The crops the processor made for each image (dropping its batch padding), in order."""
        if pixel_values.ndim != 5 or len(sizes_hw) != pixel_values.shape[0]:
            raise ValueError(
                f"tiled pixel_values must be [n_images, n_crops, C, H, W] with one image size per image; "
                f"got {tuple(pixel_values.shape)} and {len(sizes_hw)} sizes: build inputs with model.to_inputs"
            )
        tiled = tiled or [True] * len(sizes_hw)
        counts = [self.n_crops(hw, t) for hw, t in zip(sizes_hw, tiled)]
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])

    def pack(self, features: Float[Tensor, "n_crops g2 d_model"], sizes_hw: Sequence[tuple[int, int]],
             tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_tokens d_model"]:
        features = self.hook_tiles(features)
        return self.hook_packed(self.arrange(features, sizes_hw, self.image_newline, tiled))

    def arrange(self, features: Float[Tensor, "n_crops g2 d"], sizes_hw: Sequence[tuple[int, int]],
                newline: Float[Tensor, " d"], tiled: Optional[Sequence[bool]] = None) -> Float[Tensor, "n_tokens d"]:
        """Per-crop vectors (of any width ``d``) of every image in packed order, ``newline`` at the newlines."""
        out, start = [], 0
        for hw, t in zip(sizes_hw, tiled or [True] * len(sizes_hw)):
            lay = self.layout(hw, t)
            out.append(lay.arrange(features[start:start + lay.n_crops], newline))
            start += lay.n_crops
        return torch.cat(out)


class AnyresPipeline(CroppedPipeline):
    """The image pipeline of LLaVA-NeXT and LLaVA-OneVision (the module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.grouped = bool(cfg.extra.get("multi_image_mode"))  # OneVision: the processor reads a prompt's images

    def make_modules(self, cfg) -> dict[str, nn.Module]:
        return {"anyres": Anyres(cfg.d_model, cfg.extra["image_grid_pinpoints"], cfg.vision.image_size,
                                 cfg.vision.grid_size, max_tiles=cfg.extra.get("anyres_max"),
                                 multi_image=bool(cfg.extra.get("multi_image_mode")))}

    def row_layouts(self, model, groups: list[list], enc) -> list[AnyresLayout]:
        tiled = model.anyres.tiled([len(g) for g in groups], sum(len(g) for g in groups))
        return [model.anyres.layout((im.height, im.width), t) for im, t in zip([i for g in groups for i in g], tiled)]

    def features(self, model, pixel_values: Tensor, image_sizes: Sequence) -> Tensor:
        return self.prompt_features(model, pixel_values, image_sizes, None)

    def prompt_features(self, model, pixel_values: Tensor, image_sizes: Sequence,
                        images_per_row: Optional[Sequence[int]]) -> Tensor:
        """``pixel_values [n_images, n_crops, C, H, W]`` with ``image_sizes`` ((width, height) of each original
        image) give the packed features ``[n_image_tokens_total, d_model]``; ``images_per_row`` (images of each
        prompt) says which images OneVision tiles (those alone in their prompt). Crops ``[n, C, H, W]`` give each
        crop's features ``[n, g*g, d_model]``."""
        if pixel_values.ndim != 5:
            return model.tower_features(pixel_values)
        if image_sizes is None or len(image_sizes) != pixel_values.shape[0] or None in image_sizes:
            raise ValueError("tiled images need each image's original size: build inputs with model.to_inputs")
        sizes_hw = [(int(h), int(w)) for w, h in image_sizes]
        tiled = model.anyres.tiled(images_per_row, len(sizes_hw))
        crops = model.anyres.crops(pixel_values, sizes_hw, tiled)
        return model.anyres.pack(model.tower_features(crops), sizes_hw, tiled)

    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        out = self.tower_shapes(model, inputs)
        n, tokens, d_model = self.n_crops(model, inputs), model.cfg.n_image_tokens, model.cfg.d_model
        out["anyres.hook_tiles"] = (n, tokens, d_model)
        out["anyres.hook_packed"] = (int((inputs.input_ids == model.cfg.image_token_id).sum()), d_model)
        return out

    def position_means(self, model, inputs, crop_means: Float[Tensor, "n_crops tokens"]
                       ) -> Float[Tensor, " n_image_positions"]:
        """Per-crop numbers in packed order, the mean centring removed from ``image_newline`` at the newlines."""
        if inputs.pixel_values.ndim != 5:
            return crop_means.flatten()
        sizes_hw = [(int(h), int(w)) for w, h in inputs.image_sizes]
        tiled = model.anyres.tiled([len(row.images) for row in inputs.positions], len(sizes_hw))
        newline = model.anyres.removed_mean_image_newline.float()[None]
        return model.anyres.arrange(crop_means[..., None], sizes_hw, newline, tiled).flatten()
