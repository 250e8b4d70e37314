"""The pixels of the suite's models: synthetic scenes and a fixed image encoder.

A scene is a 32 x 32 picture on a 4 x 4 grid of 8-pixel patches: a grey random texture (the same in
the clean and the corrupted picture) with solid coloured patches. The encoder replaces what the vision
tower delivers (two permanent hooks): the patch embedding is set to each patch's mean colour, and the
projector's output becomes, per patch, fixed filler features plus, for a patch whose colour is in the
palette, that colour's marker and payload.
"""

from __future__ import annotations

import numpy as np
import torch

from mm_lens.circuits.groundtruth.build import FILLER, MARK

PATCH, GRID = 8, 4
SIZE = PATCH * GRID
RGB = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
       "purple": (150, 40, 200), "orange": (250, 130, 10)}


def scene(objects: dict, seed: int = 0):
    """A PIL picture with ``objects`` ``{(row, col): colour name}`` on a grey texture fixed by ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(96, 160, size=(SIZE, SIZE, 3)).astype(np.uint8)
    for (r, c), colour in objects.items():
        pixels[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = RGB[colour]
    return Image.fromarray(pixels)


def box(row: int, col: int) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, y0, x1, y1)`` of patch ``(row, col)``."""
    return (col * PATCH, row * PATCH, (col + 1) * PATCH, (row + 1) * PATCH)


@torch.no_grad()
def install_encoder(model, palette: dict, seed: int = 0) -> None:
    """Image features from pixels: ``palette`` ``{colour: (marker dim, payload [d_model])}`` (module docstring)."""
    vision = model.vision_encoder
    n_patch = model.cfg.n_image_tokens
    vision.W_patch.zero_()
    for c in range(3):
        vision.W_patch[c, c] = 1.0 / (PATCH * PATCH)
    if vision.b_patch is not None:
        vision.b_patch.zero_()
    ip = model.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    g = torch.Generator().manual_seed(seed + 200)
    filler = torch.zeros(n_patch, model.cfg.d_model)
    filler[:, FILLER] = torch.randn(n_patch, FILLER.stop - FILLER.start, generator=g)
    names = list(palette)
    rgb = torch.tensor([RGB[n] for n in names], dtype=torch.float32)
    state = {}

    def read_colours(x, hook):  # [images, 1 + patches, d_vision]: dims 0..2 are the normalised mean colour
        patches = x[:, -n_patch:, :3].float()
        state["rgb"] = (patches * std.to(x.device) + mean.to(x.device)) * 255

    def features(out, hook):
        colours = state.pop("rgb")  # [images, patches, 3]
        feats = filler.to(out.device, out.dtype).expand(out.shape[0], -1, -1).clone()
        if not names:
            return feats
        dist = (colours[:, :, None, :] - rgb.to(out.device)[None, None]).abs().amax(-1)  # [images, patches, palette]
        best = dist.argmin(-1)
        hit = dist.min(-1).values < 12
        for i, name in enumerate(names):
            marker, payload = palette[name]
            where = hit & (best == i)
            feats[where, marker] = MARK
            feats[where] += payload.to(out.device, out.dtype)
        return feats

    vision.hook_embed.add_hook(read_colours, is_permanent=True)
    model.vision_projector.hook_out.add_hook(features, is_permanent=True)
