"""Attention contribution (Yuksekgonul et al.; Basu et al. 2024).

``a(l, j -> i) = || sum_h A^{l,h}[i, j] · v_j^{l,h} W_O^{l,h} ||`` where ``v_j^{l,h}`` is head h's
value at source position j (the normed block input times ``W_V``, plus ``b_V``: for LLaVA's
bias-free Llama towers exactly the paper's ``x_j W_V``). Summed over every source j, the vectors
give the attention output at i minus ``b_O``.

The vectors are the checkpoint's whatever the weight-processing flags: ``b_V`` is added back when
``fold_value_biases`` moved it into ``b_O``, and the mean ``center_writing_weights`` removed from
``W_O`` (LayerNorm towers) is added back (:mod:`mm_lens.analysis.unprocessed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.analysis.groups import GroupLike, resolve
from mm_lens.analysis.unprocessed import checkpoint_values, head_write_means
from mm_lens.inputs import MultimodalInput


@dataclass
class Contribution:
    """``norms[layer, target, source]``: the norm of what layer ``layer``'s attention moves from
    source position to target position (sequence positions in ``sources`` / ``targets``)."""

    layers: list[int]
    sources: Int[Tensor, " source"]
    targets: Int[Tensor, " target"]
    norms: Float[Tensor, "layer target source"]
    source_grid: list[tuple[int, int]]
    grid_shape: tuple[int, int]

    def to_frame(self):
        """DataFrame: layer, target, source, source_row, source_col, contribution."""
        import pandas as pd

        rows = [(l, int(t), int(s), *self.source_grid[si], float(self.norms[li, ti, si]))
                for li, l in enumerate(self.layers) for ti, t in enumerate(self.targets.tolist())
                for si, s in enumerate(self.sources.tolist())]
        return pd.DataFrame(rows, columns=["layer", "target", "source", "source_row", "source_col", "contribution"])

    def per_layer(self) -> Float[Tensor, " layer"]:
        """Total contribution per layer (summed over sources, mean over targets): e.g. constraint -> last."""
        return self.norms.sum(-1).mean(-1)

    def source_map(self, layer: int) -> Float[Tensor, "rows cols"]:
        """Mean over targets of each image source's contribution at ``layer``, on the patch grid."""
        a = self.norms[self.layers.index(layer)].mean(0)
        out = torch.zeros(self.grid_shape)
        for j, (r, c) in enumerate(self.source_grid):
            if r >= 0:
                out[r, c] += a[j]
        return out

    def top_sources(self, layer: Optional[int] = None, k: int = 5) -> list[tuple[int, float]]:
        """``(source position, contribution)`` of the ``k`` largest sources (mean over targets, and layers if None)."""
        a = self.norms.mean(1)
        a = a.mean(0) if layer is None else a[self.layers.index(layer)]
        vals, idx = a.topk(min(k, a.numel()))
        return [(int(self.sources[i]), float(v)) for v, i in zip(vals, idx.tolist())]


def contribution_vectors(model, cache, layer: int, sources: Tensor, targets: Tensor, row: int = 0
                         ) -> Float[Tensor, "target source d_model"]:
    """The per-source vectors ``sum_h A[h, i, j] v_j^h W_O^h`` of one layer (the checkpoint's ``b_V`` and
    ``W_O``, module docstring), from a cache holding ``attn.hook_pattern`` and ``attn.hook_v`` of that layer."""
    attn = model.blocks[layer].attn
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][row]  # [head, query_pos, key_pos]
    v = cache[f"blocks.{layer}.attn.hook_v"][row]  # [pos, kv_head, d_head]
    if attn.repeat > 1:
        v = v.repeat_interleave(attn.repeat, dim=1)
    dev = pattern.device
    A = pattern[:, targets.to(dev)][:, :, sources.to(dev)]  # [head, target, source]
    v = checkpoint_values(model, layer, v[sources.to(dev)])  # [source, head, d_head]
    out_per_head = torch.einsum("she,hed->shd", v, attn.W_O)  # [source, head, d_model]
    out_per_head = out_per_head + head_write_means(model, layer, v)[..., None]
    return torch.einsum("hts,shd->tsd", A, out_per_head)


@torch.no_grad()
def attention_contribution(
    model,
    inputs: MultimodalInput,
    source: GroupLike = "image",
    target: GroupLike = "last",
    layers: Optional[Sequence[int]] = None,
    row: int = 0,
) -> Contribution:
    """Norm of the attention-weighted value-output vectors from each source to each target position, per layer.

    Typical uses: ``source="image", target=groups.question("this building")`` in early layers
    (which visual tokens carry the image into the constraint), and
    ``source=groups.question(...), target="last"`` over all layers.
    """
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    src = resolve(model, inputs, source, row)
    tgt = resolve(model, inputs, target, row)
    names = {f"blocks.{l}.attn.{h}" for l in layers for h in ("hook_pattern", "hook_v")}
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name in names, return_type=None)
    norms = torch.stack([contribution_vectors(model, cache, l, src, tgt, row).norm(dim=-1).float().cpu()
                         for l in layers])
    rp = inputs.positions[row]
    grid = []
    for p in src.tolist():
        c = rp.grid_coordinate(p)
        grid.append((-1, -1) if c is None else (c[1], c[2]))
    return Contribution(layers, src.cpu(), tgt.cpu(), norms, grid, rp.grid_shape)
