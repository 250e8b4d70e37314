"""Plots for visual tokens inside the language model: logit lens, modality similarity,
text -> image attention, visual-token budget. Every function returns a ``matplotlib`` Figure."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mm_lens.viz.common import figure as _figure
from mm_lens.viz.tracing import plot_patch_grid


def plot_logit_lens_grid(lens, layers: Optional[Sequence[int]] = None, image=None, max_cols: int = 4):
    """Per layer, the top-1 token of every image patch written on the patch grid
    (coloured by its probability; over the image when given)."""
    layers = list(lens.layers) if layers is None else list(layers)
    n_cols = min(max_cols, len(layers))
    n_rows = -(-len(layers) // n_cols)
    rows, cols = lens.grid_shape
    fig = _figure(3.2 * n_cols, 3.2 * n_rows)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, layer in zip(axes, layers):
        li = lens.layers.index(layer)
        prob = np.zeros((rows, cols))
        for pi, (r, c) in enumerate(lens.grid):
            if r >= 0:
                prob[r, c] = float(lens.top_probs[li, pi, 0])
        extent = (0, cols, rows, 0)
        if image is not None:
            ax.imshow(np.asarray(image.convert("RGB").resize((cols * 16, rows * 16))), extent=extent)
        ax.imshow(prob, cmap="Blues", alpha=0.5 if image is not None else 1.0, vmin=0, vmax=1, extent=extent)
        words = lens.patch_grid(layer)
        size = max(4, min(9, 90 // max(rows, cols)))
        for r in range(rows):
            for c in range(cols):
                ax.text(c + 0.5, r + 0.5, words[r][c].strip(), ha="center", va="center", fontsize=size)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    return fig


def plot_modality_similarity(similarities, labels: Optional[Sequence[str]] = None):
    """Per-layer cosine to the text embeddings and to the prompt's text states, one line per result."""
    sims = similarities if isinstance(similarities, (list, tuple)) else [similarities]
    labels = list(labels) if labels is not None else [f"run {i}" for i in range(len(sims))]
    fig = _figure(8, 3.2)
    axes = fig.subplots(1, 2, sharex=True)
    for sim, label in zip(sims, labels):
        axes[0].plot(sim.layers, sim.to_embeddings.numpy(), marker="o", label=label)
        axes[1].plot(sim.layers, sim.to_text.numpy(), marker="o", label=f"{label} (mean)")
        axes[1].plot(sim.layers, sim.to_text_max.numpy(), linestyle="--", label=f"{label} (max)")
    corrected = " (anisotropy-corrected)" if sims[0].anisotropy_corrected else ""
    axes[0].set_title("visual tokens vs text embeddings" + corrected, fontsize=9)
    axes[1].set_title("visual vs text hidden states" + corrected, fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        ax.legend(fontsize=7)
    return fig


def plot_attention_to_image(attention, layer: Optional[int] = None, image=None):
    """Left: attention mass to the image per layer and head; right: which patches receive it at
    ``layer`` (default: the layer with the most mass), mean over heads."""
    mass = attention.mass.numpy()
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    im = axes[0].imshow(mass.T, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("head")
    axes[0].set_xticks(range(len(attention.layers)), [str(l) for l in attention.layers], fontsize=7)
    axes[0].set_title("attention mass to the image", fontsize=9)
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    layer = attention.layers[int(mass.mean(1).argmax())] if layer is None else layer
    plot_patch_grid(attention.patch_map(layer).numpy(), image=image, ax=axes[1],
                    title=f"attention per patch, layer {layer}")
    return fig


def plot_token_budget(budget, log_x: bool = False):
    """Answer/caption loss against the number of visual tokens kept, one line per strategy."""
    curve = budget.curve()
    fig = _figure(5, 3.5)
    ax = fig.subplots()
    for strategy, row in curve.iterrows():
        ax.plot(row.index.to_numpy(), row.to_numpy(), marker="o", label=strategy)
    if log_x:
        ax.set_xscale("symlog")
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return fig


def plot_patch_ablation(grid, image=None):
    """The single-patch ablation map (loss increase when each patch alone is dropped)."""
    return plot_patch_grid(grid, image=image, title="loss increase when the patch is dropped", cmap="Reds")
