"""The image pipeline of InternVL (see :mod:`mm_lens.components.tiles` for what tiling families share).

Inputs are the checkpoint's own ``InternVLProcessor``'s: each image is resized to the ``cols x rows`` grid of
``S x S`` tiles whose aspect ratio is closest to the image's (between ``min_patches`` and ``max_patches`` tiles,
``get_optimal_tiled_canvas``) and cut into them; with more than one tile, the whole image resized to one tile (the
*thumbnail*) follows. Each crop is ``(S / patch * downsample_ratio)**2`` ``<IMG_CONTEXT>`` tokens and the processor
writes an image as ``<img>`` + its crops' tokens + ``</img>``: ``PositionMap.image`` holds the context tokens, the
markers are the named groups ``"image_start"`` / ``"image_end"``.

The tower is InternViT (:mod:`mm_lens.components.internvl_vision`); the projector reads the hidden states of
``vision_feature_layer`` (-1: the tower's output) without the class token, pixel-shuffles them and applies
LayerNorm, linear, GELU, linear (:class:`~mm_lens.components.pixel_shuffle.PixelShuffleProjector`).
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from mm_lens.components.internvl_vision import InternVisionEncoder
from mm_lens.components.pixel_shuffle import PixelShuffleProjector
from mm_lens.components.tiles import Size, TiledPipeline, TileLayout, size_field


class InternVLPipeline(TiledPipeline):
    """InternVL: dynamic tiling with a thumbnail, pixel shuffle, ``<img>``/``</img>`` markers as named groups."""

    family = "InternVL"

    def make_towers(self, cfg):
        return InternVisionEncoder(cfg.vision), PixelShuffleProjector(cfg.projector, self.scale)

    def tower(self, model, crops: Float[Tensor, "n_crops C S S"]) -> Float[Tensor, "n_crops n_patches d_vision"]:
        tower, layer = model.vision_encoder, model.cfg.vision_feature_layer
        crops = crops.to(tower.W_patch.device)
        hidden = tower(crops) if layer == -1 else tower.hidden_states(crops, [layer])[0]
        return hidden[:, 1:]  # the class token is not an image token

    def tower_shapes(self, model, n: int) -> dict[str, tuple[int, ...]]:
        from mm_lens.memory import block_shapes

        v, layer = self.vision, model.cfg.vision_feature_layer
        pos = v.n_ctx
        out = {"vision_encoder.hook_embed": (n, pos, v.d_model), "vision_encoder.hook_pos_embed": (n, pos, v.d_model)}
        per_block = block_shapes(n, pos, v.d_model, v.n_heads, v.n_heads, v.d_head, v.d_mlp, rotary=False, gated=False,
                                 parallel=False, attn_result=False)
        if v.qk_norm:
            for norm in ("attn.q_norm", "attn.k_norm"):
                per_block[f"{norm}.hook_scale"], per_block[f"{norm}.hook_normalized"] = (n, pos, 1), (n, pos, v.d_model)
        n_run = v.n_layers if layer == -1 else layer % (v.n_layers + 1)
        out.update({f"vision_encoder.blocks.{l}.{k}": s for l in range(n_run) for k, s in per_block.items()})
        if layer == -1 and v.has_ln_post:
            out.update({"vision_encoder.ln_post.hook_scale": (n, pos, 1),
                        "vision_encoder.ln_post.hook_normalized": (n, pos, v.d_model)})
        return out

    # ---------------------------------------------------------------- the processor's geometry
    def crop_pixels(self, model) -> int:
        size = self.setting(model.processor, "size")
        height, width = size_field(size, "height"), size_field(size, "width")
        if (height, width) != (self.vision.image_size,) * 2:
            raise ValueError(f"the processor makes {height}x{width} px crops, the vision tower reads "
                             f"{self.vision.image_size} px: processor and model config disagree")
        expected = getattr(model.processor, "image_seq_length", None)
        tokens = (self.vision.grid_size // self.scale) ** 2
        if expected is not None and expected != tokens:
            raise ValueError(f"the processor writes {expected} image tokens per crop, the model makes {tokens}: "
                             "processor and model config disagree")
        return self.vision.image_size

    def tile_grid(self, model, size: Size) -> tuple[int, int]:
        """(rows, cols) of tiles by the processor's own ``get_optimal_tiled_canvas``; (0, 0) for one crop."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        processor, s = model.processor, self.crop_pixels(model)
        low, high = self.setting(processor, "min_patches"), self.setting(processor, "max_patches")
        if not self.setting(processor, "crop_to_patches") or high <= 1:
            return (0, 0)
        cols, rows = get_optimal_tiled_canvas((int(size[1]), int(size[0])), (s, s), low, high)
        return (rows, cols) if rows * cols > 1 else (0, 0)

    def processor_crops(self, enc, layouts: list[list[TileLayout]]) -> list[Tensor]:
        """Each image's crops (processor order) from ``pixel_values [n_crops_total, C, S, S]``."""
        counts = [lay.n_crops for row in layouts for lay in row]
        pixels = enc["pixel_values"]
        if pixels.shape[0] != sum(counts):
            raise ValueError(f"the processor made {pixels.shape[0]} crops, the tile layouts {sum(counts)}: processor "
                             "and model config disagree")
        return list(pixels.split(counts))

    # ---------------------------------------------------------------- markers
    def spans(self, model, ids: Tensor, images: list[Tensor]) -> list[tuple[int, int]]:
        """Each image's replacement: ``<img>``, its context tokens, ``</img>``."""
        start, end = (model.tokenizer.convert_tokens_to_ids(t) for t in (model.processor.start_image_token,
                                                                          model.processor.end_image_token))
        out = []
        for positions in images:
            first, last = int(positions[0]) - 1, int(positions[-1]) + 1
            if first < 0 or last >= len(ids) or int(ids[first]) != start or int(ids[last]) != end:
                raise ValueError("an image's context tokens are not between <img> and </img>: processor and model "
                                 "config disagree")
            out.append((first, last))
        return out

    def named_positions(self, model, ids: Tensor, images: list[Tensor], spans: list[tuple[int, int]],
                        layouts: list[TileLayout]) -> dict:
        import torch

        return {"image_start": torch.tensor([s for s, _ in spans], dtype=torch.long),
                "image_end": torch.tensor([e for _, e in spans], dtype=torch.long)}

