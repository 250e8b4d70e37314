"""Plots for information storage and transfer: causal traces, attention contribution, edits.

Every function returns a ``matplotlib.figure.Figure`` (not shown; display it in a notebook or
``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mm_lens.viz.common import figure as _figure


def plot_causal_trace(trace, normalized: bool = False, cmap: Optional[str] = None):
    """One heatmap per module: restored p(target) (or the normalised indirect effect), position x layer.

    Corrupted positions are marked with ``*`` in the row labels.
    """
    values = trace.normalized_indirect_effect if normalized else trace.scores
    n_mod = len(trace.modules)
    fig = _figure(3.2 * n_mod + 1, 0.28 * len(trace.positions) + 1.6)
    axes = fig.subplots(1, n_mod, squeeze=False, sharey=True)[0]
    corrupted = set(trace.corrupted_positions.tolist())
    labels = [f"{'*' if p in corrupted else ''}{t}" for p, t in zip(trace.positions.tolist(), trace.labels)]
    colours = {"mlp": "Greens", "attn": "Reds", "resid": "Purples"}
    for ax, module, data in zip(axes, trace.modules, values):
        im = ax.imshow(data.T.numpy(), aspect="auto", cmap=cmap or colours.get(module, "viridis"),
                       interpolation="nearest")
        ax.set_title(f"{module} (window {trace.window}, {trace.window_mode})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(trace.layers)), [str(l) for l in trace.layers], fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    what = "normalised indirect effect" if normalized else f"p({trace.target_str!r})"
    fig.suptitle(f"{what}; clean {trace.p_clean:.3f}, corrupted {trace.p_corrupt:.3f}", fontsize=10)
    return fig


def input_image(model, inputs, index: int = 0):
    """Image ``index`` as the model sees it (resized, cropped; the base view for LLaVA-NeXT), as a PIL
    image: the right background for patch-grid maps."""
    from PIL import Image

    pv = inputs.pixel_values[index]
    pv = pv[0] if pv.ndim == 4 else pv  # LLaVA-NeXT: [crops, C, H, W], crop 0 is the base view
    ip = getattr(model.processor, "image_processor", None)
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5], dtype=np.float32)
    std = np.asarray(getattr(ip, "image_std", None) or [0.5, 0.5, 0.5], dtype=np.float32)
    arr = pv.detach().float().cpu().numpy().transpose(1, 2, 0) * std + mean
    return Image.fromarray((arr.clip(0, 1) * 255).astype(np.uint8))


def plot_patch_grid(grid, image=None, ax=None, title: str = "", cmap: str = "magma", alpha: float = 0.6):
    """A ``[rows, cols]`` map over the image patches (over ``image`` when given: use
    :func:`input_image` so the patches line up)."""
    grid = np.asarray(grid, dtype=float)
    fig = None
    if ax is None:
        fig = _figure(4, 4)
        ax = fig.subplots()
    rows, cols = grid.shape
    extent = (0, cols, rows, 0)
    if image is not None:
        ax.imshow(np.asarray(image.convert("RGB").resize((cols * 16, rows * 16))), extent=extent)
        im = ax.imshow(grid, cmap=cmap, alpha=alpha, extent=extent, interpolation="nearest")
    else:
        im = ax.imshow(grid, cmap=cmap, extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    (fig or ax.figure).colorbar(im, ax=ax, shrink=0.8)
    return fig if fig is not None else ax.figure


def plot_contribution(contribution, layer: Optional[int] = None, image=None):
    """Left: the total contribution per layer; right (image sources): the per-patch map at ``layer``
    (default: the layer with the largest contribution)."""
    per_layer = contribution.per_layer().numpy()
    has_grid = any(r >= 0 for r, _ in contribution.source_grid)
    fig = _figure(8 if has_grid else 4.5, 3.5)
    axes = fig.subplots(1, 2 if has_grid else 1, squeeze=False)[0]
    axes[0].plot(contribution.layers, per_layer, marker="o")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("attention contribution")
    axes[0].set_title("sources -> targets, per layer", fontsize=9)
    if has_grid:
        layer = contribution.layers[int(np.argmax(per_layer))] if layer is None else layer
        plot_patch_grid(contribution.source_map(layer).numpy(), image=image, ax=axes[1],
                        title=f"per visual token, layer {layer}")
    return fig


def plot_edit(edit):
    """p(target) and p(original answer) before and after the edit, per set (edit / paraphrase / unrelated)."""
    summary = edit.summary()
    fig = _figure(6, 3.2)
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(summary))
    for ax, what in zip(axes, ("target", "original")):
        ax.bar(x - 0.2, summary[f"p_{what}_before"], width=0.4, label="before")
        ax.bar(x + 0.2, summary[f"p_{what}_after"], width=0.4, label="after")
        ax.set_xticks(x, list(summary.index))
        ax.set_title(f"p({what})", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"rank-one edit of blocks.{edit.layer}.mlp.W_out", fontsize=10)
    return fig
