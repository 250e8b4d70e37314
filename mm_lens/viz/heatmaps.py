"""Patching heatmaps: layer x position (image positions collapsed or on the patch grid) and
per-patch maps drawn over the image.

Every function returns a ``matplotlib.figure.Figure`` (not shown).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput
from mm_lens.viz.common import figure as _figure

REDUCERS = ("mean", "sum", "max", "maxabs")


def _reduce(x: np.ndarray, how: str, axis: int) -> np.ndarray:
    if how == "mean":
        return x.mean(axis)
    if how == "sum":
        return x.sum(axis)
    if how == "max":
        return x.max(axis)
    if how == "maxabs":
        idx = np.abs(x).argmax(axis)
        return np.take_along_axis(x, np.expand_dims(idx, axis), axis).squeeze(axis)
    raise ValueError(f"reduce must be one of {REDUCERS}, got {how!r}")


def _values(result: Union[PatchResult, Tensor], axes=("layer", "pos")) -> np.ndarray:
    if isinstance(result, PatchResult):
        if tuple(result.axes[:2]) != tuple(axes):
            raise ValueError(f"need a result over {axes}, got axes {result.axes}")
        values = result.values
    else:
        values = torch.as_tensor(result)
    values = values.detach().float().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"need a [layer, pos] result, got shape {values.shape}: select a head first")
    return values


def _diverging(values: np.ndarray) -> dict:
    lim = float(np.abs(values).max()) or 1.0
    return dict(cmap="RdBu_r", vmin=-lim, vmax=lim)


def collapse_image_positions(values: np.ndarray, inputs: MultimodalInput, labels: Sequence[str], row: int = 0,
                             reduce: str = "mean") -> tuple[np.ndarray, list[str]]:
    """``[layer, pos]`` -> ``[layer, columns]`` with each image's positions as one column."""
    rp = inputs.positions[row]
    image_of = {}
    for i, pos in enumerate(rp.images):
        for p in pos.tolist():
            image_of[p] = i
    cols, names, done = [], [], set()
    for p in range(values.shape[1]):
        i = image_of.get(p)
        if i is None:
            cols.append(values[:, p])
            names.append(labels[p])
        elif i not in done:
            done.add(i)
            cols.append(_reduce(values[:, rp.images[i].cpu().numpy()], reduce, axis=1))
            names.append(f"<image {i}: {reduce} of {len(rp.images[i])}>" if len(rp.images) > 1
                         else f"<image: {reduce} of {len(rp.images[i])}>")
    return np.stack(cols, axis=1), names


def layer_position_heatmap(result: Union[PatchResult, Tensor], inputs: MultimodalInput, model=None,
                           image: str = "collapse", reduce: str = "mean", row: int = 0, title: Optional[str] = None):
    """Layers (rows) x positions (columns). ``image="collapse"``: each image's positions as one column
    (``reduce`` over them) with an extra panel of the patch grid (``maxabs`` over layers);
    ``"full"``: every position. Token labels come from ``model.to_str_tokens`` when given."""
    values = _values(result)
    n = values.shape[1]
    labels = _token_labels(model, inputs, row, n)
    if image not in ("collapse", "full"):
        raise ValueError(f"image must be 'collapse' or 'full', got {image!r}")
    has_image = len(inputs.positions[row].images) > 0
    shown, names = collapse_image_positions(values, inputs, labels, row, reduce) if image == "collapse" \
        else (values, labels)
    grid_panel = image == "collapse" and has_image
    fig = _figure(min(0.32 * shown.shape[1] + 2.5, 24) + (3.2 if grid_panel else 0), 0.35 * values.shape[0] + 2.2)
    if grid_panel:
        ax, ax_grid = fig.subplots(1, 2, width_ratios=[max(shown.shape[1], 4), 8])
    else:
        ax = fig.subplots()
    im = ax.imshow(shown, aspect="auto", **_diverging(values))
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    layers = result.label("layer") if isinstance(result, PatchResult) else list(range(values.shape[0]))
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    if image == "collapse" or n <= 80:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if grid_panel:
        grid = patch_grid(_reduce(values, "maxabs", axis=0), inputs, row=row)
        ax_grid.imshow(grid, **_diverging(values))
        ax_grid.set_title("image positions (max |.| over layers)", fontsize=8)
        ax_grid.set_xticks([])
        ax_grid.set_yticks([])
    ax.set_title(title or (f"{result.meta.get('hook', '')} patching" if isinstance(result, PatchResult) else ""))
    return fig


def patch_grid(values: Union[np.ndarray, Tensor], inputs: MultimodalInput, image: int = 0, row: int = 0) -> np.ndarray:
    """Values over positions ``[pos]`` -> ``[grid_rows, grid_cols]`` for one image (a class token dropped);
    values over the vision tower's tokens (``vision_*`` hooks) are read in their own order."""
    values = np.asarray(torch.as_tensor(values).detach().float().cpu())
    rp = inputs.positions[row]
    if image >= len(rp.images):
        raise ValueError(f"row {row} has {len(rp.images)} image(s); no image {image}")
    rows, cols = rp.grid_shape
    if values.shape[0] != inputs.shape[1] and values.shape[0] in (rows * cols, rows * cols + 1):
        return values[-rows * cols:].reshape(rows, cols)  # vision-tower tokens (a class token first)
    pos = rp.images[image].cpu().numpy()[-rows * cols:]
    return values[pos].reshape(rows, cols)


def image_heatmap(values: Union[PatchResult, np.ndarray, Tensor], inputs: MultimodalInput, image=None,
                  layers: Union[int, Sequence[int], str, None] = "maxabs", image_index: int = 0, row: int = 0,
                  alpha: float = 0.55, title: Optional[str] = None):
    """Per-patch values drawn over the image.

    ``values``: a ``[layer, pos]`` result (``layers``: one layer, a list of layers for small
    multiples, or a reducer over layers: ``"maxabs"``/``"mean"``/``"sum"``/``"max"``) or ``[pos]``
    values. ``image``: a PIL image (shown resized to the model's view), otherwise the
    de-normalised pixel values of ``inputs``.
    """
    if isinstance(values, PatchResult) or torch.as_tensor(values).ndim == 2:
        full = _values(values)
        if isinstance(layers, str):
            panels, names = [_reduce(full, layers, axis=0)], [f"{layers} over layers"]
        else:
            chosen = [layers] if isinstance(layers, int) else list(layers)
            panels, names = [full[l] for l in chosen], [f"layer {l}" for l in chosen]
    else:
        panels, names = [np.asarray(torch.as_tensor(values).detach().float().cpu())], [""]
    grids = [patch_grid(p, inputs, image_index, row) for p in panels]
    picture = _picture(inputs, image, image_index)
    fig = _figure(3.0 * len(grids) + 1, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    lim = max(float(np.abs(g).max()) for g in grids) or 1.0
    for ax, grid, name in zip(axes, grids, names):
        ax.imshow(picture, extent=(0, grid.shape[1], grid.shape[0], 0))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=alpha, extent=(0, grid.shape[1], grid.shape[0], 0),
                       interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def _picture(inputs: MultimodalInput, image, index: int) -> np.ndarray:
    if image is not None:
        return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if inputs.pixel_values is None:
        raise ValueError("no image to draw on: pass image=PIL image or inputs with pixel values")
    pix = inputs.pixel_values[index].detach().float().cpu()
    pix = (pix - pix.amin()) / (pix.amax() - pix.amin() + 1e-8)
    return pix.permute(1, 2, 0).numpy()


def _token_labels(model, inputs: MultimodalInput, row: int, n: int) -> list[str]:
    if model is None or getattr(model, "tokenizer", None) is None:
        return [str(i) for i in range(n)]
    labels = model.to_str_tokens(inputs)
    labels = labels[row] if labels and isinstance(labels[0], list) else labels
    return [f"{t.strip() or repr(t)}" for t in labels]
