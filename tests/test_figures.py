"""What the figures show: colour scale (map, range, sign), colour-bar labels, ticks, titles and font
sizes, on the bundled model where the answer's patch is known."""

import warnings

import numpy as np
import pytest

from mm_lens import load_toy
from mm_lens.analysis import activation_patch, causal_trace, corruptions, logit_lens
from mm_lens.toy import data
from mm_lens.viz import image_heatmap, knockout_curves, layer_position_heatmap, plot_causal_trace
from mm_lens.viz.common import MIN_FONT, PlotFigure, figure
from mm_lens.viz.interaction import plot_attention_to_image, plot_logit_lens_grid, plot_modality_similarity
from mm_lens.viz.report import CSS_PX_PER_INCH, attention_view


@pytest.fixture(scope="module")
def toy():
    return load_toy(device="cpu")


@pytest.fixture(scope="module")
def case(toy):
    """A colour question; blanking the asked object's patch makes the answer unlikely."""
    ex = data.make_examples(4, seed=3, kinds=("color",))[1]
    clean = toy.to_inputs(ex.image, ex.prompt)
    clean.meta.update(question=ex.question, box=ex.box)
    answer = toy.to_single_token(ex.answer)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, answer].mean()

    corrupted = corruptions.mask_region(toy, clean, ex.box)
    result = activation_patch(toy, clean, corrupted, metric, hook="resid_pre", progress=False)
    row, col = divmod(ex.objects[ex.target].cell, data.CELLS)
    return dict(example=ex, clean=clean, corrupted=corrupted, metric=metric, result=result, cell=(row, col),
                position=clean.positions.patch(row, col))


def by_hand(toy, case) -> np.ndarray:
    """The normalised effect written out: (patched - corrupted) / (clean - corrupted), metrics from fresh runs."""
    clean, corrupted = (float(case["metric"](toy(x))) for x in (case["clean"], case["corrupted"]))
    return (case["result"].values.numpy() - corrupted) / (clean - corrupted)


def colour_images(fig):
    """The imshow layers that carry data (not the background photo)."""
    return [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]


def colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_layer_position_heatmap_draws_the_normalised_effect(toy, case):
    fig = layer_position_heatmap(case["result"], case["clean"], toy)
    main, grid = colour_images(fig)
    expected = by_hand(toy, case)
    image_pos = case["clean"].positions.image.numpy()
    # the image column is the strongest patch's effect; text columns are the positions themselves
    text = [p for p in range(expected.shape[1]) if p not in set(image_pos.tolist())]
    drawn = np.asarray(main.get_array())
    np.testing.assert_allclose(drawn[:, :2], expected[:, text[:2]], atol=1e-5)
    strongest = expected[:, image_pos][np.arange(expected.shape[0]), np.abs(expected[:, image_pos]).argmax(1)]
    np.testing.assert_allclose(drawn[:, 2], strongest, atol=1e-5)
    for im in (main, grid):  # one diverging scale centred at 0 that reaches at least +-1
        lo, hi = im.get_clim()
        assert im.get_cmap().name == "RdBu_r" and lo == -hi and hi >= 1.0
    # patching the asked object's patch at layer 0 restores the answer: the top of the scale (red), not white
    layer = 0
    r, c = case["cell"]
    restoring = np.asarray(grid.get_array())[r, c]
    assert expected[layer, case["position"]] > 0.9 and restoring == pytest.approx(expected[layer, case["position"]])
    assert grid.norm(restoring) > 0.9 and abs(grid.norm(0.0) - 0.5) < 1e-9
    assert "layer 0" in grid.axes.get_title() and "largest effect" in grid.axes.get_title()
    assert any("normalised effect" in label and "1 = restored" in label for label in colorbar_labels(fig))
    assert [t.get_text() for t in main.axes.get_yticklabels()] == ["0", "1", "2"]
    assert "WARNING" not in main.axes.get_title()


def test_image_heatmap_shows_the_layer_where_the_image_matters(toy, case):
    fig = image_heatmap(case["result"], case["clean"])
    (im,) = colour_images(fig)[-1:]
    r, c = case["cell"]
    lo, hi = im.get_clim()
    assert im.get_cmap().name == "RdBu_r" and lo == -hi and hi >= 1.0
    assert im.norm(np.asarray(im.get_array())[r, c]) > 0.9
    assert im.axes.get_title() == "layer 0 (largest effect on the image)"
    assert any("normalised effect" in label for label in colorbar_labels(fig))
    raw = image_heatmap(case["result"], case["clean"], layers=[2], normalize=False)
    assert any("patched metric" in label for label in colorbar_labels(raw))


def test_a_corruption_that_does_not_corrupt_is_flagged(toy, case):
    weak = corruptions.pixel_noise(case["clean"], std=0.01)
    result = activation_patch(toy, case["clean"], weak, case["metric"], hook="resid_pre", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the figure says it, without a second warning
        fig = layer_position_heatmap(result, case["clean"], toy)
    assert "WARNING: the corruption barely changes the metric" in fig.axes[0].get_title()


def test_causal_trace_panels_share_one_scale(toy, case):
    trace = causal_trace(toy, case["clean"], corrupt="circle", progress=False, positions="text")
    fig = plot_causal_trace(trace)
    images = colour_images(fig)
    assert len(images) == len(trace.modules) and len({im.get_clim() for im in images}) == 1
    lo, hi = images[0].get_clim()
    assert lo == 0 and hi == pytest.approx(max(trace.p_clean, float(trace.scores.max())))
    assert colorbar_labels(fig) == [f"p({trace.target_str!r}) after restoring"]
    normalized = colour_images(plot_causal_trace(trace, normalized=True))
    assert len({im.get_clim() for im in normalized}) == 1 and normalized[0].get_clim()[1] >= 1.0
    assert normalized[0].get_clim()[0] == -normalized[0].get_clim()[1]


def integer_labels(labels) -> bool:
    texts = [t.get_text().replace("\u2212", "-") for t in labels if t.get_text()]
    return bool(texts) and all(float(t) == int(float(t)) for t in texts)


def test_layers_and_heads_get_integer_ticks(toy, case):
    from mm_lens.analysis import attention_to_image, knockout_edges, modality_similarity

    edges = knockout_edges(toy, case["clean"], [("image", "last"), ("question", "last")], window=3, progress=False)
    fig = knockout_curves(edges)
    fig.canvas.draw()
    assert integer_labels(fig.axes[0].get_xticklabels())
    fig = plot_attention_to_image(attention_to_image(toy, case["clean"], queries="last"))
    fig.canvas.draw()
    assert integer_labels(fig.axes[0].get_yticklabels()) and integer_labels(fig.axes[0].get_xticklabels())
    assert "(most attention mass)" in fig.axes[2].get_title() or "(most attention mass)" in fig.axes[1].get_title()
    fig = plot_modality_similarity(modality_similarity(toy, case["clean"]))
    fig.canvas.draw()
    assert integer_labels(fig.axes[0].get_xticklabels())


def test_logit_lens_words_are_readable_or_left_out(toy, case):
    lens = logit_lens(toy, case["clean"], positions="image")
    fig = plot_logit_lens_grid(lens)
    words = [t for ax in fig.axes for t in ax.texts]
    assert len(words) == 9 * len(lens.layers) and min(t.get_fontsize() for t in words) >= MIN_FONT
    fine = lens.__class__(**{**lens.__dict__, "grid_shape": (24, 24)})  # a LLaVA-sized grid
    fig = plot_logit_lens_grid(fine, layers=[0])
    assert not fig.axes[0].texts and "too fine" in fig.axes[0].get_title()


def visible_text_sizes(fig) -> list[float]:
    fig.canvas.draw()
    return [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
            if t.get_visible() and t.get_text().strip()]


def test_report_figures_are_readable_at_the_size_the_report_shows_them(toy):
    """Every text in every report figure is at least 10 CSS px tall as displayed (the page is 1100 px wide)."""
    from mm_lens.demo import build_report, toy_cases

    report = build_report(toy, toy_cases(1))
    assert len(report.figures) >= 12
    for fig, caption in report.figures:
        scale = min(1.0, 1080 / (fig.get_figwidth() * CSS_PX_PER_INCH))
        smallest = min(visible_text_sizes(fig)) * CSS_PX_PER_INCH / 72 * scale
        assert smallest >= 10, (caption, smallest)


def test_figures_display_in_notebooks():
    fig = figure(2, 2)
    assert isinstance(fig, PlotFigure) and fig._repr_png_().startswith(b"\x89PNG")


def test_attention_view_escapes_labels_and_closes_its_container():
    import torch

    html = attention_view(["<s>", "<img 0,0>", "<div/>", "a&b"], torch.full((1, 4, 4), 0.25))
    assert html.lstrip().startswith("<div") and html.split(">", 1)[0].rstrip()[-1] != "/"
    assert html.split(">", 2)[1].startswith("</div")
    assert '"&lt;s&gt;", "&lt;img 0,0&gt;", "&lt;div/&gt;", "a&amp;b"' in html


def test_a_partial_effect_looks_partial(toy, case):
    """Half of the clean-corrupted difference restored is half-way up the scale, not its top."""
    import torch

    from mm_lens.analysis import PatchResult

    n_pos = case["clean"].shape[1]
    values = torch.full((3, n_pos), -4.0)
    values[1, 5] = -2.0  # corrupted -4, clean 0: restores half
    result = PatchResult(values, ("layer", "pos"), baseline=torch.tensor([-4.0]), source_metric=torch.tensor([0.0]),
                         meta={"hook": "resid_pre", "direction": "denoise"})
    (im,) = colour_images(layer_position_heatmap(result, case["clean"], toy, image="full"))
    assert np.asarray(im.get_array())[1, 5] == pytest.approx(0.5)
    assert im.get_clim() == (-1.0, 1.0) and im.norm(0.5) == pytest.approx(0.75)
