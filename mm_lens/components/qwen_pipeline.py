"""The image pipeline of Qwen2-VL and Qwen2.5-VL (see :mod:`mm_lens.components.pipeline` for the slot).

Inputs are the checkpoint's own ``Qwen2VLProcessor``'s: each image is resized so both sides are multiples
of ``patch_size * spatial_merge_size`` (``smart_resize``, between the processor's ``min_pixels`` and
``max_pixels``), and each ``<|image_pad|>`` becomes one token per merged ``m x m`` block of patches. A prompt
without a placeholder gets ``<|vision_start|><|image_pad|><|vision_end|>`` at its start for each image
(Qwen's chat template frames images so; those markers are the named positions ``"image_start"`` and
``"image_end"``). ``pixel_values`` keep every resized image, ``[n_images, C, H, W]``
(padded to the largest), from which the vision tower recomputes the processor's flattened patches exactly.

Positions (M-RoPE, as Hugging Face's ``get_rope_index``): text tokens count up on all three axes; the tokens
of an image starting at position ``s`` take ``(s, s + row, s + col)`` on its merged grid, and the text after
it continues at ``s + max(rows, cols)``. Padding gets 0. Video input is refused for now.

Qwen3-VL (:class:`Qwen3Pipeline`): the same inputs and positions (its rotary interleaves the three axes over the
frequency bands, :class:`~mm_lens.components.rotary.Rotary`), and DeepStack: the tower's hidden states after
``deepstack_layers`` go through mergers of their own (``deepstack_mergers.{j}``, hooked as the projector) and
are added at the image positions after the language model's blocks ``0 .. k-1`` (``blocks.{j}.hook_visual_in``).
Its image features are ``[n_image_positions, (1 + k) * d_model]``: the projector's output, then each DeepStack
merger's, so that whatever selects or repeats image positions carries all of them along.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mm_lens.components.pipeline import (
    GridRowPositions,
    ImagePipeline,
    as_prompts,
    encoded_inputs,
    encoded_row,
    largest_grid,
    processor_inputs,
)
from mm_lens.components.qwen_vision import PatchMerger, QwenVisionEncoder

Grid = tuple[int, int]


def unpatchify(flat: Float[Tensor, "n patch_dim"], grid: Grid, channels: int, frames: int, patch: int, merge: int
               ) -> Float[Tensor, "channel height width"]:
    """The resized image back from the processor's flattened patches (first of the identical frames)."""
    rows, cols = grid
    x = flat.reshape(rows // merge, cols // merge, merge, merge, channels, frames, patch, patch)[..., 0, :, :]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, rows * patch, cols * patch)


class QwenPipeline(ImagePipeline):
    """Qwen2-VL / Qwen2.5-VL images: dynamic resolution, 2x2 patch merger, M-RoPE positions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.merge = cfg.vision.spatial_merge_size
        self.markers = (cfg.extra["image_start_token_id"], cfg.extra["image_end_token_id"])

    def make_towers(self, cfg):
        vision = cfg.vision
        return QwenVisionEncoder(vision), PatchMerger(cfg.projector, vision.d_model, self.merge,
                                                      vision.normalization_type)

    # ---------------------------------------------------------------- inputs
    def build_inputs(self, model, images, prompts, padding_side: Optional[str] = None, add_special_tokens: bool = True,
                     **processor_kwargs):
        from mm_lens.inputs import _per_prompt_images

        if processor_kwargs:
            raise TypeError(f"{sorted(processor_kwargs)}: Qwen-VL's image grids follow the processor's own resize "
                            "settings (set them on model.processor.image_processor instead)")
        prompts = as_prompts(prompts)
        token = model.image_token
        groups, _ = _per_prompt_images(images, prompts, token)
        start, end = model.tokenizer.convert_ids_to_tokens(list(self.markers))
        prompts = [p if token in p or not g else (start + token + end) * len(g) + p for p, g in zip(prompts, groups)]
        enc, flat = processor_inputs(model.processor, [i for g in groups for i in g], prompts, padding_side,
                                     add_special_tokens, "Qwen-VL")
        sizes = [(im.width, im.height) for im in flat]
        pixels, grids = self._images(model, enc, sizes) if flat else (None, [])
        rows, k = [], 0
        for b, (prompt, group) in enumerate(zip(prompts, groups)):
            row_grids = [(r // self.merge, c // self.merge) for r, c in grids[k:k + len(group)]]
            k += len(group)
            counts = [r * c for r, c in row_grids]
            rows.append(encoded_row(GridRowPositions, model, enc, b, prompt, counts, add_special_tokens,
                                    grid_shape=largest_grid(row_grids), grids=row_grids))
        return encoded_inputs(model, enc, rows, pixels, sizes)

    def _images(self, model, enc, sizes) -> tuple[Tensor, list[Grid]]:
        """The resized images ``[n, C, H, W]`` (padded to the largest) and each one's patch grid."""
        v = self.vision
        thw = enc["image_grid_thw"].tolist()
        grids = [(h, w) for _, h, w in thw]
        if any(t != 1 for t, _, _ in thw):
            raise ValueError(f"an image came out of the processor with {thw} (time, rows, cols) patches: expected one "
                             "frame per image")
        expected = self.patch_grids(model, sizes)
        if grids != expected:
            raise ValueError(f"the processor's patch grids {grids} differ from those of its resize settings {expected}")
        pieces = enc["pixel_values"].split([h * w for h, w in grids])
        images = [unpatchify(p, g, v.n_channels, v.temporal_patch_size, v.patch_size, self.merge)
                  for p, g in zip(pieces, grids)]
        height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        out = images[0].new_zeros(len(images), v.n_channels, height, width)
        for i, image in enumerate(images):
            out[i, :, :image.shape[1], :image.shape[2]] = image
        return out, grids

    def patch_grids(self, model, image_sizes: Sequence) -> list[Grid]:
        """(rows, cols) of patches of each image of original ``(width, height)``, by the processor's resize."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if not image_sizes or any(s is None for s in image_sizes):
            raise ValueError("Qwen-VL needs each image's original size (its grid depends on it): build the inputs "
                             "with model.to_inputs from PIL images, paths or arrays")
        ip = model.processor.image_processor
        p = self.vision.patch_size
        out = []
        for w, h in image_sizes:
            rh, rw = smart_resize(int(h), int(w), factor=p * self.merge, min_pixels=ip.size["shortest_edge"],
                                  max_pixels=ip.size["longest_edge"])
            out.append((rh // p, rw // p))
        return out

    # ---------------------------------------------------------------- features and positions
    def features(self, model, pixel_values: Float[Tensor, "n_images C H W"], image_sizes: Sequence
                 ) -> Float[Tensor, "n_image_positions d_model"]:
        """Tower and merger on every image; the merged tokens of each image in order (padding dropped), each row
        followed by the DeepStack mergers' features of the same token (Qwen3-VL)."""
        if pixel_values.ndim != 4:
            raise ValueError(f"Qwen-VL pixel_values are the resized images [n_images, C, H, W] that model.to_inputs "
                             f"makes, got shape {tuple(pixel_values.shape)}")
        grids = self.patch_grids(model, image_sizes)
        if len(grids) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(grids)} image sizes")
        hidden, kept = model.vision_encoder.run(pixel_values.to(model.vision_encoder.W_patch.device), grids)
        merged = [model.vision_projector(hidden.to(model.vision_projector.W_in.device))]
        merged += [merger(h.to(merger.W_in.device)) for merger, h in zip(self.deepstack_mergers(model), kept)]
        counts = [r * c // self.merge**2 for r, c in grids]
        return torch.cat([torch.cat([m[:k] for m, k in zip(t, counts)]).to(merged[0].device) for t in merged], dim=-1)

    def deepstack_mergers(self, model) -> list:
        """The mergers whose features the language model adds after its first blocks (Qwen3-VL; none here)."""
        return []

    def position_ids(self, model, inputs) -> Optional[Int[Tensor, "3 batch pos"]]:
        """M-RoPE position ids (module docstring); None for text alone (where they equal the 1-D ones)."""
        rows = inputs.positions.rows
        if not any(getattr(r, "grids", None) and r.images for r in rows):
            return None
        ids = torch.zeros(3, *inputs.shape, dtype=torch.long)
        mask = inputs.attention_mask.bool().cpu()
        for b, row in enumerate(rows):
            real = mask[b].nonzero().flatten()
            images = [(p.cpu(), g) for p, g in zip(row.images, getattr(row, "grids", []))]
            ids[:, b, real] = row_positions(real, images)
        return ids.to(inputs.input_ids.device)

    # ---------------------------------------------------------------- what memory estimates and groups read
    def hook_shapes(self, model, inputs) -> dict[str, tuple[int, ...]]:
        from mm_lens.memory import block_shapes

        v = self.vision
        grids = self.patch_grids(model, inputs.image_sizes)
        n, pos = len(grids), max(r * c for r, c in grids)
        out = {"vision_encoder.hook_embed": (n, pos, v.d_model)}
        per_block = block_shapes(n, pos, v.d_model, v.n_heads, v.n_heads, v.d_head, v.d_mlp, rotary=True,
                                 gated=v.gated_mlp, parallel=False, attn_result=False)
        out.update({f"vision_encoder.blocks.{l}.{k}": s for l in range(v.n_layers) for k, s in per_block.items()})
        out.update(self.merger_shapes("vision_projector", n, pos, model.vision_projector))
        if v.n_position_embeddings:
            out["vision_encoder.hook_pos_embed"] = (n, pos, v.d_model)
        for j, merger in enumerate(self.deepstack_mergers(model)):
            out.update(self.merger_shapes(f"deepstack_mergers.{j}", n, pos, merger))
        return out

    def cell_size(self, model) -> int:
        return self.vision.merge_cell

    def merger_shapes(self, name: str, n: int, pos: int, merger) -> dict[str, tuple[int, ...]]:
        """The hooks of a :class:`PatchMerger` registered as ``name`` on ``n`` images of ``pos`` patches."""
        tokens, d_in = pos // self.merge**2, merger.cfg.d_in
        normed = (n, tokens, d_in) if merger.postshuffle else (n, pos, self.vision.d_model)
        return {f"{name}.hook_in": (n, pos, self.vision.d_model), f"{name}.ln_q.hook_scale": (*normed[:2], 1),
                f"{name}.ln_q.hook_normalized": normed, f"{name}.hook_hidden": (n, tokens, d_in),
                f"{name}.hook_out": (n, tokens, merger.cfg.d_out)}

    def box_masks(self, model, image_size: tuple[int, int], box) -> Bool[Tensor, "1 rows cols"]:
        """The merged tokens a box touches: the box drawn on a mask of the original size, resized by the processor
        (no normalisation); a token counts if any pixel of its cell is above 0.5."""
        from mm_lens.analysis.groups import box_image

        v = self.vision
        enc = model.processor.image_processor(images=[box_image(image_size, box)], return_tensors="pt",
                                              do_normalize=False)
        _, rows, cols = enc["image_grid_thw"][0].tolist()
        mask = unpatchify(enc["pixel_values"], (rows, cols), v.n_channels, v.temporal_patch_size, v.patch_size,
                          self.merge)[0]
        c = v.merge_cell
        cells = mask.reshape(rows // self.merge, c, cols // self.merge, c).transpose(1, 2)
        return (cells > 0.5).flatten(2).any(-1)[None]


class Qwen3Pipeline(QwenPipeline):
    """Qwen3-VL images: Qwen2-VL's inputs and positions, plus the DeepStack mergers (module docstring)."""

    def make_modules(self, cfg) -> dict[str, nn.Module]:
        merger = lambda: PatchMerger(cfg.projector, self.vision.d_model, self.merge, "LN", postshuffle=True)  # noqa: E731
        return {"deepstack_mergers": nn.ModuleList(merger() for _ in self.vision.deepstack_layers)}

    def deepstack_mergers(self, model) -> list:
        return list(model.deepstack_mergers)


def row_positions(real: Int[Tensor, " n_real"], images: Sequence[tuple[Tensor, Grid]]) -> Int[Tensor, "3 n_real"]:
    """M-RoPE ids of one row's real tokens (``real``: their positions); ``images``: each image's positions and
    merged (rows, cols) grid, in order."""
    pieces, current, done = [], 0, 0
    for positions, (rows, cols) in images:
        first = int(torch.searchsorted(real, positions[0]))
        pieces.append(torch.arange(current, current + first - done).expand(3, -1))
        current += first - done
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pieces.append(torch.stack([torch.zeros_like(r), r, c]).reshape(3, -1) + current)
        current += max(rows, cols)
        done = first + rows * cols
    pieces.append(torch.arange(current, current + len(real) - done).expand(3, -1))
    return torch.cat(pieces, dim=1)
