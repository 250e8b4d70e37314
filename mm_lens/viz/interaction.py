"""Plots for visual tokens inside the language model: logit lens, modality similarity,
text -> image attention, visual-token budget. Every function returns a ``matplotlib`` Figure."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mm_lens.viz.common import MIN_FONT, colorbar, integer_ticks
from mm_lens.viz.common import figure as _figure
from mm_lens.viz.tracing import plot_patch_grid


def plot_logit_lens_grid(lens, layers: Optional[Sequence[int]] = None, image=None, max_cols: int = 4,
                         width: float = 10.0):
    """Per layer, the top-1 token of every image patch written on the patch grid (cells coloured
    by its probability; over the image when given). The words are sized to fit their cells and
    left out (the title says so) when the grid is too fine to write them at a readable size."""
    layers = list(lens.layers) if layers is None else list(layers)
    n_cols = min(max_cols, len(layers))
    n_rows = -(-len(layers) // n_cols)
    rows, cols = lens.grid_shape
    panel = min(3.2, width / n_cols)
    fig = _figure(panel * n_cols + 0.9, (panel + 0.35) * n_rows)
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
        im = ax.imshow(prob, cmap="Blues", alpha=0.55 if image is not None else 1.0, vmin=0, vmax=1, extent=extent)
        words = [[w.strip().replace("-", "-\n") for w in line] for line in lens.patch_grid(layer)]
        size = _fitting_font(words, cell_points=panel * 72 / max(rows, cols))
        if size:
            for r in range(rows):
                for c in range(cols):
                    ax.text(c + 0.5, r + 0.5, words[r][c], ha="center", va="center", fontsize=size, linespacing=0.9)
        ax.set_title(f"layer {layer}" + ("" if size else " (grid too fine for words)"), fontsize=MIN_FONT + 1)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    colorbar(fig, im, list(axes), "top-1 probability")
    return fig


def _fitting_font(words: list[list[str]], cell_points: float) -> float:
    """The largest font (<= 11 pt) at which every word fits its cell; 0 when that is below MIN_FONT."""
    longest = max((len(part) for line in words for w in line for part in w.split("\n")), default=1)
    lines = max((w.count("\n") + 1 for line in words for w in line), default=1)
    size = min(11.0, 0.9 * cell_points / (0.62 * max(longest, 1)), 0.9 * cell_points / (1.25 * lines))
    return size if size >= MIN_FONT else 0


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
    axes[0].set_title("visual tokens vs text embeddings" + corrected, fontsize=MIN_FONT + 1)
    axes[1].set_title("visual vs text hidden states" + corrected, fontsize=MIN_FONT + 1)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        ax.legend(fontsize=MIN_FONT)
        integer_ticks(ax)
    return fig


def plot_attention_to_image(attention, layer: Optional[int] = None, image=None):
    """Left: attention mass to the image per layer and head; right: which patches receive it at
    ``layer`` (default: the layer with the most mass; the title says which and why), mean over heads."""
    mass = attention.mass.numpy()
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    im = axes[0].imshow(mass.T, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("head")
    axes[0].set_xticks(range(len(attention.layers)), [str(l) for l in attention.layers], fontsize=MIN_FONT)
    integer_ticks(axes[0], "y")
    axes[0].set_title("attention mass to the image", fontsize=MIN_FONT + 1)
    colorbar(fig, im, axes[0], "attention mass (sum over image positions)")
    why = "chosen" if layer is not None else "most attention mass"
    layer = attention.layers[int(mass.mean(1).argmax())] if layer is None else layer
    plot_patch_grid(attention.patch_map(layer).numpy(), image=image, ax=axes[1],
                    title=f"attention per patch, layer {layer} ({why})", label="attention (mean over heads)", vmin=0)
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
    ax.set_ylabel("loss on the answer tokens")
    ax.legend(fontsize=MIN_FONT)
    integer_ticks(ax)
    return fig


def plot_patch_ablation(grid, image=None):
    """The single-patch ablation map (loss increase when each patch alone is dropped)."""
    return plot_patch_grid(grid, image=image, title="loss increase when the patch is dropped", cmap="Reds",
                           label="loss increase (nats)")
