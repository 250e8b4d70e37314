"""Text -> image attention: how much of each head's attention the query positions put on the image.

``mass[layer, head]`` is the attention mass from the query group to all image positions
(sum over image keys, mean over query positions); ``per_patch[layer, head, patch]`` splits it
over the image positions (in sequence order; ``grid`` gives each one's patch coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.analysis.groups import GroupLike, resolve
from mm_lens.inputs import MultimodalInput


@dataclass
class ImageAttention:
    """Attention from ``queries`` to the image, per layer and head.

    ``mass``: ``[layer, head]``; ``per_patch``: ``[layer, head, image_pos]``; ``image_positions``
    and ``query_positions`` are sequence positions; ``grid[i]`` is image position i's ``(row, col)``.
    """

    layers: list[int]
    query_positions: Int[Tensor, " query"]
    image_positions: Int[Tensor, " image_pos"]
    mass: Float[Tensor, "layer head"]
    per_patch: Float[Tensor, "layer head image_pos"]
    grid: list[tuple[int, int]]
    grid_shape: tuple[int, int]

    def to_frame(self):
        """DataFrame: layer, head, mass."""
        import pandas as pd

        rows = [(l, h, float(self.mass[i, h])) for i, l in enumerate(self.layers) for h in range(self.mass.shape[1])]
        return pd.DataFrame(rows, columns=["layer", "head", "mass"])

    def patch_frame(self):
        """DataFrame: layer, head, position, row, col, attention."""
        import pandas as pd

        rows = [(l, h, int(p), *self.grid[j], float(self.per_patch[i, h, j]))
                for i, l in enumerate(self.layers) for h in range(self.mass.shape[1])
                for j, p in enumerate(self.image_positions.tolist())]
        return pd.DataFrame(rows, columns=["layer", "head", "position", "row", "col", "attention"])

    def patch_map(self, layer: int, head: Optional[int] = None) -> Float[Tensor, "rows cols"]:
        """Attention per patch on the grid at ``layer`` (one head, or the mean over heads); class tokens dropped."""
        a = self.per_patch[self.layers.index(layer)]
        a = a.mean(0) if head is None else a[head]
        out = torch.zeros(self.grid_shape)
        for j, (r, c) in enumerate(self.grid):
            if r >= 0:
                out[r, c] += a[j]
        return out

    def top_patches(self, layer: Optional[int] = None, head: Optional[int] = None, k: int = 5
                    ) -> list[tuple[int, int, int, float]]:
        """The ``k`` image positions receiving most attention: ``(position, row, col, attention)``.

        ``layer``/``head`` None average over layers/heads.
        """
        a = self.per_patch if layer is None else self.per_patch[self.layers.index(layer)][None]
        a = a.mean(0)
        a = a.mean(0) if head is None else a[head]
        vals, idx = a.topk(min(k, a.numel()))
        return [(int(self.image_positions[i]), *self.grid[i], float(v)) for v, i in zip(vals, idx.tolist())]


@torch.no_grad()
def attention_to_image(
    model,
    inputs: MultimodalInput,
    queries: GroupLike = "text",
    layers: Optional[Sequence[int]] = None,
    row: int = 0,
) -> ImageAttention:
    """Per layer and head, the attention mass from ``queries`` to the image positions of batch row ``row``.

    ``queries``: ``"text"`` (text positions after the first image position: the instruction),
    ``"question"``, ``"last"``, or any position group.
    """
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    image = resolve(model, inputs, "image", row)
    q = resolve(model, inputs, queries, row)
    if isinstance(queries, str) and queries == "text":
        q = q[q > image.min()]
        if q.numel() == 0:
            raise ValueError("no text position follows the image: pass queries='last' or explicit positions")
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name in names, return_type=None)
    per_patch = []
    for l in layers:
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][row]  # [head, query_pos, key_pos]
        sub = pattern[:, q.to(pattern.device)][:, :, image.to(pattern.device)]  # [head, query, image_pos]
        per_patch.append(sub.float().mean(1).cpu())
    per_patch = torch.stack(per_patch)
    rp = inputs.positions[row]
    grid = []
    for p in image.tolist():
        c = rp.grid_coordinate(p)
        grid.append((-1, -1) if c is None else (c[1], c[2]))
    return ImageAttention(layers, q.cpu(), image.cpu(), per_patch.sum(-1), per_patch, grid, rp.grid_shape)
