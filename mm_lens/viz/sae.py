"""An SAE feature on the picture: a heatmap over the image grid, and a small HTML dashboard of its top patches."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from mm_lens.data import LLAVA_TEMPLATE
from mm_lens.inputs import MultimodalInput
from mm_lens.viz.common import MIN_FONT, colorbar, diverging
from mm_lens.viz.common import figure as _figure
from mm_lens.viz.report import Report, _data_uri, image_png
from mm_lens.viz.tracing import input_image

SEQUENTIAL = "magma"  # feature activations are >= 0 for ReLU, TopK and JumpReLU SAEs: 0 dark, the largest bright


def feature_image_map(model, sae, inputs: MultimodalInput, feature: int, row: int = 0, image: int = 0,
                      alpha: float = 0.65, title: Optional[str] = None):
    """Feature ``feature`` of ``sae`` over the patch grid of one image, drawn on the image as the model sees it.

    The colour scale runs from 0 (dark) to the largest activation on this image (bright), with a colour bar
    labelled with the feature and its hook; a feature that can be negative gets a diverging scale centred
    at 0. The hottest patch is outlined and named in the title.
    """
    from mm_lens.sae.features import feature_acts, feature_grid
    from mm_lens.sae.names import resolve_hook_name

    hook = resolve_hook_name(model, sae.cfg.metadata.hook_name)
    grid = feature_grid(model, feature_acts(model, sae, inputs, feature), inputs, hook, row, image)
    grid = grid.detach().float().cpu().numpy()
    index = sum(len(inputs.positions[r].images) for r in range(row)) + image
    rows, cols = grid.shape
    if grid.min() < 0:
        scale = diverging(grid)
    else:
        scale = dict(cmap=SEQUENTIAL, vmin=0.0, vmax=float(grid.max()) or 1.0)
    fig = _figure(4.2, 3.6)
    ax = fig.subplots()
    extent = (0, cols, rows, 0)
    ax.imshow(np.asarray(input_image(model, inputs, index)), extent=extent)
    im = ax.imshow(grid, alpha=alpha, extent=extent, interpolation="nearest", **scale)
    hot_r, hot_c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    ax.add_patch(_outline(hot_c, hot_r))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"SAE feature {feature} at {hook}\nlargest at patch ({hot_r}, {hot_c}): {grid.max():.3g}",
                 fontsize=MIN_FONT + 1)
    colorbar(fig, im, ax, f"feature {feature} activation")
    return fig


def _outline(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col, row), 1, 1, fill=False, edgecolor="cyan", linewidth=2)


def feature_dashboard(model, sae, dataset: Iterable, feature: int, k: int = 16, path: Union[str, Path, None] = None,
                      examples_per_forward: int = 8, template: str = LLAVA_TEMPLATE) -> str:
    """A self-contained HTML page for one feature over ``dataset``: how often it is active on image patches,
    its ``k`` top-activating patches cropped from their images (the patch outlined, one patch of context),
    and the feature over the whole image of the top example. Returns the HTML; ``path`` also writes it."""
    from mm_lens.sae.features import top_patches
    from mm_lens.sae.training import _forward_batches

    dataset = list(dataset)
    top = top_patches(model, sae, dataset, feature, k, examples_per_forward, template)
    report = Report(f"SAE feature {feature} at {top.hook_name}")
    report.table([[len(dataset), top.n_patches, f"{top.n_active / top.n_patches:.1%}", f"{top.max_activation:.4g}"]],
                 ["examples", "image patches", "active (> 0)", "largest activation"])
    if top.patches:
        report.heading(f"Top {len(top.patches)} image patches")
        report.raw_html("".join(_tile(p) for p in top.patches), css="patches")
        best = top.patches[0]
        inputs, _ = next(_forward_batches(model, dataset[best.example:best.example + 1], 1, template))
        report.heading("The top example")
        report.figure(feature_image_map(model, sae, inputs, feature), best.prompt)
    page = report.render().replace("</style>", _STYLE + "</style>", 1)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


_STYLE = """
.patches figure { width: 112px; } .patches img { width: 96px; image-rendering: pixelated; border: 1px solid #ccc; }
.patches figcaption { font-size: .8em; }
"""


def _tile(patch) -> str:
    """One top patch: the crop with the patch outlined, its activation and where it is from."""
    crop = Image.fromarray(patch.crop)
    scale = max(1, 96 // max(crop.size))
    crop = crop.resize((crop.width * scale, crop.height * scale), Image.NEAREST)
    x0, y0, x1, y1 = (v * scale for v in patch.box)
    ImageDraw.Draw(crop).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 255), width=max(1, scale // 2))
    caption = f"{patch.activation:.3g} · example {patch.example}, patch ({patch.row}, {patch.col})"
    return (f'<figure><img alt="{html.escape(caption)}" title="{html.escape(patch.prompt)}" '
            f'src="{_data_uri(image_png(crop))}"><figcaption>{html.escape(caption)}</figcaption></figure>')
