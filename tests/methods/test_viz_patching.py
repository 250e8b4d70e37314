import numpy as np
import pytest

from mm_lens.analysis.knockout import knockout_edges
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch
from mm_lens.testing import random_image
from mm_lens.viz.circuit import circuit_diagram, node_column
from mm_lens.viz.heatmaps import collapse_image_positions, image_heatmap, layer_position_heatmap, patch_grid
from mm_lens.viz.knockout import knockout_curves

pytest.importorskip("matplotlib")


def metric(logits):
    return logits[:, -1, 7]


def test_patch_grid_and_collapse_known_values(model, pair):
    clean, _ = pair
    n = clean.shape[1]
    values = np.arange(n, dtype=float)[None].repeat(2, 0)
    grid = patch_grid(values[0], clean)
    rp = clean.positions[0]
    assert grid.shape == rp.grid_shape
    assert grid[1, 2] == rp.patch(1, 2)
    collapsed, names = collapse_image_positions(values, clean, [str(i) for i in range(n)])
    assert collapsed.shape == (2, n - len(rp.image) + 1)
    col = names.index(next(x for x in names if x.startswith("<image")))
    assert collapsed[0, col] == pytest.approx(rp.image.float().mean().item())
    rows, cols = rp.grid_shape
    vision = np.arange(rows * cols + 1, dtype=float)  # vision-tower order, class token first
    assert patch_grid(vision, clean)[1, 2] == 1 + cols + 2


def test_heatmaps_and_curves_return_figures(model, pair):
    from matplotlib.figure import Figure

    clean, corrupted = pair
    res = activation_patch(model, clean, corrupted, metric, progress=False)
    for image in ("collapse", "full"):
        assert isinstance(layer_position_heatmap(res, clean, model, image=image), Figure)
    assert isinstance(image_heatmap(res, clean, layers=[0, 1]), Figure)
    assert isinstance(image_heatmap(res, clean, image=random_image(0), layers="maxabs"), Figure)
    x = model.to_inputs([random_image(0), random_image(2)], ["USER: <image>\nwhat ? ASSISTANT:"] * 2)
    edges = knockout_edges(model, x, [("image", "last"), ("last", "last")], window=1, progress=False)
    fig = knockout_curves(edges)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2 + 1  # two edges and the zero line


def test_circuit_diagram_html(model, pair):
    clean, corrupted = pair
    assert node_column("L2H3", 3) == (2.35, "head") and node_column("logits", 3)[1] == "logits"
    pp = path_patch(model, clean, corrupted, metric, senders=["L0H0", "L1H1", "mlp0"], receivers="logits",
                    progress=False)
    diagram = circuit_diagram(pp, n_layers=model.cfg.n_layers, title="direct effects")
    html = diagram._repr_html_()
    assert html.count('class="edge"') == len(diagram.edges) >= 1
    assert "<svg" in html and "<script>" in html and "logits" in html
    manual = circuit_diagram({("image", "L1H0"): 0.5, ("L1H0", "logits"): -0.2, ("question", "L1H0"): 0.1}, top_k=2)
    assert len(manual.edges) == 2 and manual.n_layers == 2
    with pytest.raises(ValueError, match="no edges"):
        circuit_diagram({})
