"""Corruptions for a clean/corrupted pair of runs. Both runs always carry their image.

Input corruptions return a new :class:`MultimodalInput` (same positions); embedding noise
is a forward hook on ``hook_embed`` (use it with ``run_with_hooks`` or pass it to a method).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from mm_lens.analysis import unprocessed
from mm_lens.analysis.groups import GroupLike, resolve
from mm_lens.inputs import MultimodalInput


# ---------------------------------------------------------------- text
def replace_text(model, inputs: MultimodalInput, old: str, new: str, row: Optional[int] = None) -> MultimodalInput:
    """Replace ``old`` by ``new`` in the prompt(s); the token count must stay the same."""
    ids = inputs.input_ids.clone()
    rows = range(inputs.shape[0]) if row is None else [row]
    for r in rows:
        span = inputs.positions[r].span(old)
        new_ids = model.tokenizer(new, add_special_tokens=False)["input_ids"]
        if len(new_ids) != len(span):
            raise ValueError(f"{old!r} is {len(span)} tokens but {new!r} is {len(new_ids)}: choose a replacement "
                             "with the same token count (positions must line up between the two runs)")
        ids[r, span] = torch.tensor(new_ids, device=ids.device)
    return inputs.with_input_ids(ids)


def replace_tokens(inputs: MultimodalInput, positions: Tensor, token_id: int, row: int = 0) -> MultimodalInput:
    """Put ``token_id`` at each of ``positions`` (keeps the length), e.g. a constraint span -> one fixed token."""
    ids = inputs.input_ids.clone()
    ids[row, positions] = token_id
    return inputs.with_input_ids(ids)


# ---------------------------------------------------------------- embeddings
def embedding_std(model) -> float:
    """Standard deviation of the checkpoint's token embedding matrix (ROME's noise scale unit), whatever the
    weight-processing flags (centring ``W_E``'s rows would shrink it)."""
    return unprocessed.embedding_std(model)


def embedding_noise_hook(model, inputs: MultimodalInput, group: GroupLike = "image", k: float = 3.0, seed: int = 0,
                         std: Optional[float] = None):
    """``(hook_name, hook_fn)`` adding k x std Gaussian noise to the embeddings at ``group`` (every row).

    The noise is drawn once, so every run with this hook sees the same corruption. On Qwen3-VL the image also
    enters after the first blocks (DeepStack, ``blocks.{l}.hook_visual_in``), which this noise does not reach: noising
    image positions warns (corrupt the pixels, e.g. :func:`other_image` or :func:`pixel_noise`, to reach both).
    """
    scale = k * (std if std is not None else embedding_std(model))
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(inputs.shape, dtype=torch.bool)
    for r in range(inputs.shape[0]):
        masks[r, resolve(model, inputs, group, r).cpu()] = True
    if getattr(model, "n_deepstack", 0) and bool((masks & inputs.positions.image_mask.cpu()).any()):
        warnings.warn("noise on the embeddings of image positions: this model also adds the image's DeepStack "
                      "features after its first blocks (blocks.{l}.hook_visual_in), which keep the clean image; "
                      "corrupt the pixels (corruptions.other_image / pixel_noise) to reach both", stacklevel=2)
    noise = torch.randn(*inputs.shape, model.cfg.d_model, generator=gen) * scale * masks[..., None]

    def hook(embed: Tensor, hook) -> Tensor:
        return embed + noise.to(embed.device, embed.dtype)

    return ("hook_embed", hook)


# ---------------------------------------------------------------- images
def _image_processor(model):
    return getattr(model.processor, "image_processor", None)


def pixel_noise(inputs: MultimodalInput, std: float = 1.0, seed: int = 0) -> MultimodalInput:
    """Gaussian noise on the (normalised) pixel values."""
    gen = torch.Generator().manual_seed(seed)
    pv = inputs.pixel_values
    return inputs.with_pixel_values(pv + std * torch.randn(pv.shape, generator=gen).to(pv.device, pv.dtype))


def blank_image(inputs: MultimodalInput, value: float = 0.0) -> MultimodalInput:
    """Every image replaced by a constant in normalised pixel space (0 = the dataset mean colour)."""
    return inputs.with_pixel_values(torch.full_like(inputs.pixel_values, value))


def other_image(model, inputs: MultimodalInput, images: Sequence) -> MultimodalInput:
    """The same prompts with other images (one per original image)."""
    from mm_lens.inputs import preprocess_images

    if getattr(model, "image_pipeline", None) is not None:  # a family's own processing (sizes, grids, crops)
        pv = model.to_inputs(list(images), [row.prompt for row in inputs.positions]).pixel_values
    else:
        vision = model.cfg.vision
        pv = preprocess_images(list(images), _image_processor(model),
                               (vision.n_channels, vision.image_size, vision.image_size))
    return inputs.with_pixel_values(pv.to(inputs.pixel_values.device, inputs.pixel_values.dtype))


def mask_region(model, inputs: MultimodalInput, box: Sequence[float], image: int = 0, mode: str = "mean",
                blur_sigma: float = 2.0) -> MultimodalInput:
    """Blank (``mode="mean"``: normalised 0) or blur (``mode="blur"``) the patches a box touches.

    ``image`` indexes the images of the batch in order. Cropped images (LLaVA-NeXT, OneVision, Gemma 3
    pan-and-scan): in every crop (the base image or thumbnail and each tile or crop), the patches
    :func:`~mm_lens.analysis.groups.box_crop_masks` finds there; a family's image pipeline says where an image's
    crops are in ``pixel_values`` and how many pixels a grid cell covers.
    """
    from mm_lens.analysis.groups import box_crop_masks

    if mode not in ("mean", "blur"):
        raise ValueError(f"mode must be 'mean' or 'blur', got {mode!r}")
    size = inputs.image_sizes[image] if image < len(inputs.image_sizes) else None
    if size is None:
        raise ValueError("mask_region needs the original image size: build the inputs from PIL images or paths")
    pipeline = getattr(model, "image_pipeline", None)
    pv = inputs.pixel_values.clone()
    if pipeline is not None:  # a family's own crops and grid cells
        masks = pipeline.image_box_masks(model, inputs, image, box)  # [n_crops, rows, cols]
        crops, p = pipeline.image_crops(inputs.with_pixel_values(pv), image), pipeline.cell_size(model)
    else:
        masks, crops, p = box_crop_masks(model, size, box), pv[image:image + 1], model.cfg.vision.patch_size
    for crop, grid in zip(crops, masks):  # views into pv
        pixel_mask = torch.zeros(crop.shape[-2:], dtype=torch.bool, device=crop.device)
        pixel_mask[: grid.shape[0] * p, : grid.shape[1] * p] = grid.repeat_interleave(p, 0).repeat_interleave(p, 1)
        replacement = torch.zeros_like(crop) if mode == "mean" else _gaussian_blur(crop, blur_sigma)
        crop[:, pixel_mask] = replacement[:, pixel_mask]
    return inputs.with_pixel_values(pv)


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = img.shape[0]
    out = torch.nn.functional.conv2d(img[None], kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)
    return out[0]
