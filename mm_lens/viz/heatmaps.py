"""Patching heatmaps: layer x position (image positions collapsed or on the patch grid) and
per-patch maps drawn over the image.

Every function returns a ``matplotlib.figure.Figure`` (not shown).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput
from mm_lens.viz.common import DIVERGING, MIN_FONT, colorbar, diverging
from mm_lens.viz.common import figure as _figure

REDUCERS = ("mean", "sum", "max", "maxabs")
REDUCER_NAMES = {"maxabs": "strongest"}  # how a collapsed column's label names its reduction


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


@dataclass
class Shown:
    """What a patching heatmap draws: the values, the colour scale and what the colours mean."""

    values: np.ndarray  # [layer, pos]
    label: str  # colour-bar label
    scale: dict  # imshow cmap / vmin / vmax
    layers: list
    note: str = ""  # e.g. a corruption that does not corrupt


def shown_values(result: Union[PatchResult, Tensor, np.ndarray], normalize: bool = True) -> Shown:
    """The values a patching heatmap draws.

    A :class:`PatchResult` carrying the clean and corrupted metrics is drawn as the normalised
    effect of TransformerLens / ARENA (``PatchResult.normalized()``): ``(metric - corrupted) /
    (clean - corrupted)``, on a diverging scale centred at 0 that always reaches ±1, so 1 (the
    clean metric restored) is the top of the scale and 0 (no effect) is white. ``normalize=False``
    (or a bare tensor) draws the raw metric, centred at the corrupted run's metric when it is known.
    """
    if not isinstance(result, PatchResult):
        values = _as_2d(result)
        return Shown(values, "value", diverging(values), list(range(values.shape[0])))
    if tuple(result.axes[:2]) != ("layer", "pos"):
        raise ValueError(f"need a result over ('layer', 'pos'), got axes {result.axes}")
    layers = result.label("layer")
    has_metrics = result.baseline is not None and result.source_metric is not None
    note = weak_corruption(result) if has_metrics and not result.meta.get("normalized") else ""
    if result.meta.get("normalized") or (normalize and has_metrics):
        shown = result if result.meta.get("normalized") else _quietly_normalized(result)
        values = _as_2d(shown.values)
        if result.meta.get("direction", "denoise") == "noise":
            label = "normalised effect\n(1 = no effect, 0 = corrupted)"
        else:
            label = "normalised effect\n(0 = no effect, 1 = restored)"
        return Shown(values, label, diverging(values, at_least=1.0), layers, note)
    values = _as_2d(result.values)
    if has_metrics:  # raw metric, white at the unpatched base run
        base = float(result.baseline.float().mean())
        return Shown(values, f"patched metric\n(white: unpatched, {base:.3g})", _centred(values, base), layers, note)
    return Shown(values, "patched metric", diverging(values), layers, note)


def weak_corruption(result: PatchResult) -> str:
    """A warning when the corruption barely changes the metric (then normalised effects are noise), else ''."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result.normalized()
        except ValueError as e:
            return str(e)
    return str(caught[0].message) if caught else ""


def _quietly_normalized(result: PatchResult) -> PatchResult:
    with warnings.catch_warnings():  # weak_corruption() reports it, in the figure's title
        warnings.simplefilter("ignore")
        return result.normalized()


def _centred(values: np.ndarray, centre: float) -> dict:
    from matplotlib.colors import TwoSlopeNorm

    span = max(float(np.abs(values - centre).max()), 1e-6)
    return dict(cmap=DIVERGING, norm=TwoSlopeNorm(centre, centre - span, centre + span))


def _as_2d(values) -> np.ndarray:
    values = torch.as_tensor(values).detach().float().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"need a [layer, pos] result, got shape {values.shape}: select a head first")
    return values


def strongest_layer(values: np.ndarray, positions: Sequence[int]) -> int:
    """Index of the layer with the largest |effect| at ``positions``."""
    return int(np.abs(values[:, list(positions)]).max(1).argmax())


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
            how = REDUCER_NAMES.get(reduce, reduce)
            names.append(f"<image {i}: {how} of {len(rp.images[i])}>" if len(rp.images) > 1
                         else f"<image: {how} of {len(rp.images[i])}>")
    return np.stack(cols, axis=1), names


def layer_position_heatmap(result: Union[PatchResult, Tensor], inputs: MultimodalInput, model=None,
                           image: str = "collapse", reduce: str = "maxabs", row: int = 0, title: Optional[str] = None,
                           normalize: bool = True):
    """Layers (rows) x positions (columns) of a patching result, as the normalised effect (see
    :func:`shown_values`) on a diverging scale centred at 0 with a labelled colour bar.

    ``image="collapse"``: each image's positions as one column (``reduce`` over them; by default the
    strongest effect, so one patch that matters shows) and a
    second panel with the image positions on the patch grid at the layer where they matter
    most (the title says which); ``"full"``: every position. Token labels come from
    ``model.to_str_tokens`` when given.
    """
    shown = shown_values(result, normalize)
    values = shown.values
    labels = _token_labels(model, inputs, row, values.shape[1])
    if image not in ("collapse", "full"):
        raise ValueError(f"image must be 'collapse' or 'full', got {image!r}")
    rp = inputs.positions[row]
    matrix, names = collapse_image_positions(values, inputs, labels, row, reduce) if image == "collapse" \
        else (values, labels)
    grid_panel = image == "collapse" and len(rp.images) > 0
    fig = _figure(min(0.3 * matrix.shape[1] + 2.8, 8.5) + (2.6 if grid_panel else 0), 0.3 * values.shape[0] + 2.6)
    axes = fig.subplots(1, 2, width_ratios=[max(matrix.shape[1], 4), 7]) if grid_panel else [fig.subplots()]
    ax = axes[0]
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", **shown.scale)
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(shown.layers)), [str(l) for l in shown.layers])
    if image == "collapse" or len(names) <= 60:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=MIN_FONT)
    if grid_panel:
        layer = strongest_layer(values, rp.image.tolist())
        ax_grid = axes[1]
        ax_grid.imshow(patch_grid(values[layer], inputs, row=row), interpolation="nearest", **shown.scale)
        ax_grid.set_title(f"image patches, layer {shown.layers[layer]}\n(largest effect on the image)",
                          fontsize=MIN_FONT + 1)
        ax_grid.set_xticks([])
        ax_grid.set_yticks([])
    colorbar(fig, im, list(axes), shown.label)
    hook = result.meta.get("hook", "") if isinstance(result, PatchResult) else ""
    ax.set_title(_title(title or f"{hook} activation patching".strip(), shown.note), fontsize=MIN_FONT + 2)
    return fig


def _title(title: str, note: str) -> str:
    """The title, with a warning line when the corruption barely changes the metric."""
    if not note:
        return title
    return f"{title}\nWARNING: the corruption barely changes the metric; these effects are mostly noise"


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
                  layers: Union[int, Sequence[int], str, None] = None, image_index: int = 0, row: int = 0,
                  alpha: float = 0.6, title: Optional[str] = None, normalize: bool = True):
    """Per-patch values drawn over the image, on a diverging scale centred at 0 with a labelled colour bar.

    ``values``: a ``[layer, pos]`` patching result (drawn as the normalised effect, see
    :func:`shown_values`) or ``[pos]`` values. ``layers``: None (the layer with the largest
    effect on the image's patches; the panel title says so), one layer, a list of layers for
    small multiples, or a reducer over layers (``"maxabs"``/``"mean"``/``"sum"``/``"max"``).
    ``image``: a PIL image (shown resized to the model's view), otherwise the de-normalised
    pixel values of ``inputs``.
    """
    note = ""
    if isinstance(values, PatchResult) or torch.as_tensor(values).ndim == 2:
        shown = shown_values(values, normalize)
        full, label, scale, note = shown.values, shown.label, shown.scale, shown.note
        positions = inputs.positions[row].images[image_index].tolist()
        if layers is None:
            best = strongest_layer(full, positions)
            panels, names = [full[best]], [f"layer {shown.layers[best]} (largest effect on the image)"]
        elif isinstance(layers, str):
            panels, names = [_reduce(full, layers, axis=0)], [f"{layers} over layers"]
        else:
            chosen = [layers] if isinstance(layers, int) else list(layers)
            panels, names = [full[l] for l in chosen], [f"layer {shown.layers[l]}" for l in chosen]
    else:
        panels, names = [np.asarray(torch.as_tensor(values).detach().float().cpu())], [""]
        label, scale = "value", diverging(panels[0])
    grids = [patch_grid(p, inputs, image_index, row) for p in panels]
    picture = _picture(inputs, image, image_index)
    fig = _figure(2.8 * len(grids) + 1.4, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, grid, name in zip(axes, grids, names):
        extent = (0, grid.shape[1], grid.shape[0], 0)
        ax.imshow(picture, extent=extent)
        im = ax.imshow(grid, alpha=alpha, extent=extent, interpolation="nearest", **scale)
        ax.set_title(name, fontsize=MIN_FONT + 1)
        ax.set_xticks([])
        ax.set_yticks([])
    colorbar(fig, im, list(axes), label)
    if title or note:
        fig.suptitle(_title(title or "", note).strip(), fontsize=MIN_FONT + 2)
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
