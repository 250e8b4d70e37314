"""The image pipeline of Idefics3 and SmolVLM (see :mod:`mm_lens.components.tiles` for what tiling families share).

Inputs are the checkpoint's own ``Idefics3Processor`` / ``SmolVLMProcessor``'s: each image is resized (longest
edge ``size["longest_edge"]``), then to multiples of ``max_image_size`` and cut into ``rows x cols`` tiles of that
size; the whole image resized to one tile is the *global image*. An image that fits one tile is the global image
alone. Each crop is ``(S / patch / scale)**2`` ``<image>`` tokens; the processor writes an image as::

    <fake_token_around_image><row_1_col_1><image>... <fake_token_around_image><row_1_col_2><image>... \\n
    ... \\n \\n <fake_token_around_image><global-img><image>... <fake_token_around_image>

``PositionMap.image`` holds the ``<image>`` tokens only; the markers are named groups: ``"image_marker"`` (every
``<fake_token_around_image>``), ``"tile_marker"`` (``<row_r_col_c>``), ``"global_marker"`` (``<global-img>``),
``"image_newline"`` (the row breaks inside an image's text), ``"image_start"`` / ``"image_end"`` (the first and
the last ``<fake_token_around_image>`` of each image).

The tower is SigLIP with NaViT-style positions (:class:`Idefics3VisionEncoder`); the connector is the pixel
shuffle and a linear map (:class:`~mm_lens.components.pixel_shuffle.PixelShuffleProjector`). Hugging Face's patch
attention mask (for padded images) is all ones for every crop the processor makes (crops are always full
``S x S`` squares; the batch's padding crops are dropped, here by count): a crop with padding is refused.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.components.pixel_shuffle import PixelShuffleProjector
from mm_lens.components.tiles import Size, TiledPipeline, TileLayout, size_field
from mm_lens.components.vision import VisionEncoder


@lru_cache(maxsize=64)
def bucket_positions(side: int, rows: int, cols: int) -> Int[Tensor, " n_patches"]:
    """Rows of the ``side x side`` position table read by a crop of ``rows x cols`` patches: each patch's
    fractional coordinate ``index / count`` (float32), bucketed by the table's boundaries ``k / side`` as
    Hugging Face's ``Idefics3VisionEmbeddings`` does (not always ``index * side // count``: float rounding moves
    some patches to the bucket below, e.g. for 19 x 19 patches)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)

    def buckets(n: int) -> Tensor:
        fractional = torch.arange(n, dtype=torch.float32) * (1.0 / torch.tensor([n]))
        return torch.bucketize(fractional.clamp(max=1.0 - 1e-6), boundaries, right=True)

    return (buckets(rows)[:, None] * side + buckets(cols)[None, :]).flatten()


class Idefics3VisionEncoder(VisionEncoder):
    """SigLIP (patch embedding with bias, no class token, ``ln_post`` on every position) whose crops may have any
    multiple of the patch size: a crop of ``rows x cols`` patches reads the learned ``side x side`` position table
    at :func:`bucket_positions` (``hook_pos_embed``)."""

    def check_pixels(self, pixel_values: Tensor) -> None:
        p, c = self.cfg.patch_size, self.cfg.n_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c or pixel_values.shape[2] % p or pixel_values.shape[3] % p:
            raise ValueError(f"crops must be [n_crops, {c}, H, W] with H and W multiples of {p}, got "
                             f"{tuple(pixel_values.shape)}")

    def embed(self, pixel_values: Float[Tensor, "n_crops channel height width"]) -> Float[Tensor, "n_crops n d_model"]:
        self.check_pixels(pixel_values)
        patches = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=self.cfg.patch_size)
        x = self.hook_embed(patches.flatten(2).transpose(1, 2))  # [n_crops, n_patches, d_model]
        index = bucket_positions(self.cfg.grid_size, patches.shape[2], patches.shape[3]).to(self.W_pos.device)
        return x + self.hook_pos_embed(self.W_pos[index].expand(x.shape[0], -1, -1))


class Idefics3Pipeline(TiledPipeline):
    """Idefics3 / SmolVLM: tiles and a global image, pixel shuffle, marker tokens as named groups."""

    family = "Idefics3 / SmolVLM"
    grouped = True

    def make_towers(self, cfg):
        return Idefics3VisionEncoder(cfg.vision), PixelShuffleProjector(cfg.projector, self.scale)

    def tower(self, model, crops: Float[Tensor, "n_crops C S S"]) -> Float[Tensor, "n_crops n_patches d_vision"]:
        return model.vision_encoder(crops.to(model.vision_encoder.W_patch.device))  # ln_post included

    def tower_shapes(self, model, n: int) -> dict[str, tuple[int, ...]]:
        from mm_lens.memory import block_shapes

        v = self.vision
        pos = (self.crop_pixels(model) // v.patch_size) ** 2
        out = {"vision_encoder.hook_embed": (n, pos, v.d_model), "vision_encoder.hook_pos_embed": (n, pos, v.d_model)}
        per_block = block_shapes(n, pos, v.d_model, v.n_heads, v.n_heads, v.d_head, v.d_mlp, rotary=False, gated=False,
                                 parallel=False, attn_result=False)
        out.update({f"vision_encoder.blocks.{l}.{k}": s for l in range(v.n_layers) for k, s in per_block.items()})
        out.update({"vision_encoder.ln_post.hook_scale": (n, pos, 1), "vision_encoder.ln_post.hook_normalized":
                    (n, pos, v.d_model)})
        return out

    # ---------------------------------------------------------------- the processor's geometry
    def crop_pixels(self, model) -> int:
        side = _edge(self.setting(model.processor, "max_image_size"))
        if side % (self.vision.patch_size * self.scale):
            raise ValueError(f"max_image_size {side} is not a multiple of patch size x scale factor "
                             f"({self.vision.patch_size} x {self.scale})")
        expected = getattr(model.processor, "image_seq_len", None)
        if expected is not None and expected != (side // (self.vision.patch_size * self.scale)) ** 2:
            raise ValueError(f"the processor writes {expected} image tokens per crop, but {side} px crops make "
                             f"{(side // (self.vision.patch_size * self.scale)) ** 2}: processor and model config "
                             "disagree")
        return side

    def tile_grid(self, model, size: Size) -> tuple[int, int]:
        """(rows, cols) of tiles the processor cuts an image of ``size`` into, by its own rules: the first resize
        (``get_resize_output_image_size``), then up to multiples of ``max_image_size`` (checked against the
        processor's tokens in :meth:`named_positions`)."""
        from transformers.models.idefics3.image_processing_idefics3 import get_resize_output_image_size

        processor, m = model.processor, self.crop_pixels(model)
        if not self.setting(processor, "do_image_splitting"):
            return (0, 0)
        w, h = int(size[0]), int(size[1])
        if self.setting(processor, "do_resize"):
            target = self.setting(processor, "size")
            longest = size_field(target, "longest_edge")
            if longest:
                h, w = get_resize_output_image_size(torch.empty(()).expand(h, w), resolution_max_side=longest)
            else:
                h, w = size_field(target, "height"), size_field(target, "width")
        aspect = w / h
        if w >= h:
            w = math.ceil(w / m) * m
            h = math.ceil(int(w / aspect) / m) * m
        else:
            h = math.ceil(h / m) * m
            w = math.ceil(int(h * aspect) / m) * m
        return (h // m, w // m) if h > m or w > m else (0, 0)

    def processor_crops(self, enc, layouts: list[list[TileLayout]]) -> list[Tensor]:
        """Each image's crops (processor order) from ``pixel_values [batch, max_crops, C, S, S]``."""
        pixels, pixel_mask = enc["pixel_values"], enc.get("pixel_attention_mask")
        out = []
        for b, row in enumerate(layouts):
            start = 0
            for lay in row:
                end = start + lay.n_crops
                if pixel_mask is not None and not bool(pixel_mask[b, start:end].bool().all()):
                    raise ValueError("the processor padded a crop (pixel_attention_mask not all ones); only full "
                                     "crops are supported, as the processor makes them by default")
                out.append(pixels[b, start:end])
                start = end
        return out

    # ---------------------------------------------------------------- markers
    def spans(self, model, ids: Tensor, images: list[Tensor]) -> list[tuple[int, int]]:
        """Each image's replacement: from the ``<fake_token_around_image>`` before its first crop to the one after
        its global image."""
        fake = model.tokenizer.convert_tokens_to_ids(model.processor.fake_image_token)
        fakes = (ids == fake).nonzero().flatten().tolist()
        out, previous = [], -1
        for positions in images:
            first, last = int(positions[0]), int(positions[-1])
            before = [p for p in fakes if previous < p < first]
            if not before or last + 1 not in fakes:
                raise ValueError(f"an image's tokens are not framed by {model.processor.fake_image_token!r} tokens: "
                                 "processor and model config disagree")
            out.append((before[0], last + 1))
            previous = last + 1
        return out

    def named_positions(self, model, ids: Tensor, images: list[Tensor], spans: list[tuple[int, int]],
                        layouts: list[TileLayout]) -> dict:
        """The marker groups (module docstring), checking each crop's marker against the tile layout."""
        tokenizer, processor = model.tokenizer, model.processor
        fake = tokenizer.convert_tokens_to_ids(processor.fake_image_token)
        global_token = getattr(processor, "global_image_token", None) or processor.global_image_tag  # SmolVLM, Idefics3
        names = {k: [] for k in ("image_marker", "tile_marker", "global_marker", "image_newline")}
        for positions, (start, end), lay in zip(images, spans, layouts):
            cursor = start
            for j in range(lay.n_crops):  # sequence order: tiles, then the global image
                first = int(positions[j * lay.side**2])
                gap = list(range(cursor, first))
                k = next((i for i, p in enumerate(gap) if int(ids[p]) == fake), None)
                if k is None:
                    raise ValueError("a crop's tokens do not follow a <fake_token_around_image>: processor and model "
                                     "config disagree")
                names["image_newline"] += gap[:k]
                names["image_marker"].append(gap[k])
                marker = gap[k + 1:]
                is_global = j == lay.n_crops - 1
                expected = global_token if is_global else "<row_{}_col_{}>".format(
                    *(d + 1 for d in divmod(j, lay.tile_grid[1])))
                if tokenizer.decode([int(ids[p]) for p in marker]).strip() != expected:
                    raise ValueError(f"crop {j} of an image is marked {tokenizer.decode(ids[marker].tolist())!r}, its tile "
                                     f"layout {lay.tile_grid} says {expected!r}: processor and model config disagree")
                names["global_marker" if is_global else "tile_marker"] += marker
                cursor = first + lay.side**2
            names["image_marker"].append(end)
        named = {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in names.items()}
        named["image_start"] = torch.tensor([s for s, _ in spans], dtype=torch.long)
        named["image_end"] = torch.tensor([e for _, e in spans], dtype=torch.long)
        return named



def _edge(setting) -> int:
    """``longest_edge`` of a size setting."""
    value = size_field(setting, "longest_edge")
    if value is None:
        raise ValueError(f"expected a size setting with 'longest_edge', got {setting!r}")
    return value
