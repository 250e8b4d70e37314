"""Plots for information storage and transfer: causal traces, attention contribution, edits.

Every function returns a ``matplotlib.figure.Figure`` (not shown; display it in a notebook or
``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mm_lens.viz.common import MIN_FONT, colorbar, diverging, integer_ticks
from mm_lens.viz.common import figure as _figure


def plot_causal_trace(trace, normalized: bool = False, cmap: Optional[str] = None):
    """One heatmap per module (position x layer), all on one colour scale with one labelled colour bar.

    ``normalized=False``: restored p(target) on ``[0, max(p_clean, largest restored p)]``, so a
    panel that restores nothing stays pale next to one that restores the answer;
    ``normalized=True``: the normalised indirect effect on a diverging scale centred at 0 that
    reaches ±1. Corrupted positions are marked with ``*`` in the row labels.
    """
    values = (trace.normalized_indirect_effect if normalized else trace.scores).float().numpy()
    if normalized:
        scale = diverging(values, at_least=1.0)
        label = "normalised indirect effect\n(0 = no effect, 1 = restored)"
    else:
        scale = dict(cmap="Purples", vmin=0.0, vmax=max(float(trace.p_clean), float(values.max()), 1e-6))
        label = f"p({trace.target_str!r}) after restoring"
    if cmap:
        scale["cmap"] = cmap
    n_mod = len(trace.modules)
    fig = _figure(min(2.6 * n_mod + 1.8, 10), 0.26 * len(trace.positions) + 2.0)
    axes = fig.subplots(1, n_mod, squeeze=False, sharey=True)[0]
    corrupted = set(trace.corrupted_positions.tolist())
    labels = [f"{'*' if p in corrupted else ''}{t}" for p, t in zip(trace.positions.tolist(), trace.labels)]
    for ax, module, data in zip(axes, trace.modules, values):
        im = ax.imshow(data.T, aspect="auto", interpolation="nearest", **scale)
        ax.set_title(module, fontsize=MIN_FONT + 1)
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(trace.layers)), [str(l) for l in trace.layers], fontsize=MIN_FONT)
        ax.set_yticks(range(len(labels)), labels, fontsize=MIN_FONT)
    colorbar(fig, im, list(axes), label)
    fig.suptitle(f"causal trace (window {trace.window}, {trace.window_mode}): p({trace.target_str!r}) clean "
                 f"{trace.p_clean:.3f}, corrupted {trace.p_corrupt:.3f}; * = corrupted", fontsize=MIN_FONT + 1)
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


def plot_patch_grid(grid, image=None, ax=None, title: str = "", cmap: str = "magma", alpha: float = 0.6,
                    label: str = "value", vmin: Optional[float] = None, vmax: Optional[float] = None):
    """A ``[rows, cols]`` map over the image patches (over ``image`` when given: use
    :func:`input_image` so the patches line up), with a colour bar labelled ``label``."""
    grid = np.asarray(grid, dtype=float)
    fig = None
    if ax is None:
        fig = _figure(4, 3.6)
        ax = fig.subplots()
    rows, cols = grid.shape
    extent = (0, cols, rows, 0)
    if image is not None:
        ax.imshow(np.asarray(image.convert("RGB").resize((cols * 16, rows * 16))), extent=extent)
    im = ax.imshow(grid, cmap=cmap, alpha=alpha if image is not None else 1.0, extent=extent, interpolation="nearest",
                   vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=MIN_FONT + 1)
    ax.set_xticks([])
    ax.set_yticks([])
    colorbar(fig or ax.figure, im, ax, label)
    return fig if fig is not None else ax.figure


def plot_contribution(contribution, layer: Optional[int] = None, image=None):
    """Left: the total contribution per layer; right (image sources): the per-patch map at ``layer``
    (default: the layer with the largest contribution; the title says which and why)."""
    per_layer = contribution.per_layer().numpy()
    has_grid = any(r >= 0 for r, _ in contribution.source_grid)
    fig = _figure(8 if has_grid else 4.5, 3.5)
    axes = fig.subplots(1, 2 if has_grid else 1, squeeze=False)[0]
    axes[0].plot(contribution.layers, per_layer, marker="o")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("attention contribution (norm)")
    axes[0].set_title("sources -> targets, per layer", fontsize=MIN_FONT + 1)
    integer_ticks(axes[0])
    if has_grid:
        why = "chosen" if layer is not None else "largest contribution"
        layer = contribution.layers[int(np.argmax(per_layer))] if layer is None else layer
        plot_patch_grid(contribution.source_map(layer).numpy(), image=image, ax=axes[1],
                        title=f"per visual token, layer {layer} ({why})", label="contribution (norm)", vmin=0)
    return fig


def plot_edit(edit):
    """p(target) and p(original answer) before and after the edit, per set (edit / paraphrase / unrelated)."""
    summary = edit.summary()
    fig = _figure(6, 3.2)
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(summary))
    target = edit.model.tokenizer.decode([edit.target]) if getattr(edit.model, "tokenizer", None) else edit.target
    for ax, what, name in zip(axes, ("target", "original"), (f"target {target!r}", "original answer")):
        ax.bar(x - 0.2, summary[f"p_{what}_before"], width=0.4, label="before")
        ax.bar(x + 0.2, summary[f"p_{what}_after"], width=0.4, label="after")
        ax.set_xticks(x, list(summary.index))
        ax.set_ylim(0, 1)
        ax.set_title(f"p({name})", fontsize=MIN_FONT + 1)
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=MIN_FONT)
    fig.suptitle(f"rank-one edit of blocks.{edit.layer}.mlp.W_out", fontsize=MIN_FONT + 2)
    return fig
