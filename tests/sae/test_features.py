"""A feature over the image grid (what the figure shows) and its top patches over a dataset (the dashboard)."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mm_lens.sae import feature_acts, top_patches
from mm_lens.sae.features import feature_grid
from mm_lens.toy import data
from mm_lens.viz.sae import feature_dashboard, feature_image_map
from tests.sae.conftest import HOOK, make_sae


@pytest.fixture(scope="module")
def sae():
    return make_sae(seed=5)


def hot_feature(toy, sae, inputs):
    """The feature with the largest activation on the image, and that activation's patch."""
    _, cache = toy.run_with_cache(inputs, names_filter=[HOOK])
    acts = sae.encode(cache[HOOK])[0, inputs.positions.image]  # [9, d_sae], row-major over the 3x3 grid
    feature = int(acts.max(0).values.argmax())
    return feature, acts[:, feature].reshape(3, 3)


def test_feature_acts_on_the_grid_equal_the_encoded_cache(toy, sae, pair):
    clean, _ = pair
    feature, expected = hot_feature(toy, sae, clean)
    values = feature_acts(toy, sae, clean, feature)
    assert values.shape == clean.shape
    grid = feature_grid(toy, values, clean, HOOK)
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=0)
    r, c = 2, 1
    assert float(grid[r, c]) == pytest.approx(float(values[0, clean.positions.patch(r, c)]))
    with toy.saes([sae]):  # spliced in: the same values
        torch.testing.assert_close(feature_acts(toy, sae, clean, feature), values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="outside 0..47"):
        feature_acts(toy, sae, clean, 48)


def test_vision_tower_sae_on_the_grid(toy, pair):
    clean, _ = pair
    hook = "vision_encoder.blocks.0.hook_resid_post"
    sae = make_sae(hook=hook)
    _, cache = toy.run_with_cache(clean, names_filter=[hook])
    expected = sae.encode(cache[hook])[0, 1:, 3].reshape(3, 3)  # patches after the class token
    torch.testing.assert_close(feature_grid(toy, feature_acts(toy, sae, clean, 3), clean, hook), expected)


def test_feature_image_map_shows_the_activation_with_its_scale(toy, sae, pair):
    clean, _ = pair
    feature, expected = hot_feature(toy, sae, clean)
    fig = feature_image_map(toy, sae, clean, feature)
    ax = fig.axes[0]
    photo, overlay = ax.images
    drawn = np.asarray(overlay.get_array())
    np.testing.assert_allclose(drawn, expected.numpy(), atol=1e-5)
    lo, hi = overlay.get_clim()
    assert lo == 0 and hi == pytest.approx(float(expected.max())) and overlay.get_cmap().name == "magma"
    assert overlay.norm(float(expected.max())) == pytest.approx(1.0) and overlay.norm(0.0) == 0.0
    r, c = np.unravel_index(int(expected.argmax()), (3, 3))
    outline = ax.patches[0]
    assert outline.get_xy() == (c, r) and outline.get_width() == outline.get_height() == 1  # the hot cell
    assert f"patch ({r}, {c})" in ax.get_title() and f"feature {feature}" in ax.get_title() and HOOK in ax.get_title()
    bar = [a for a in fig.axes if a.get_label() == "<colorbar>"][0]
    assert bar.get_ylabel() == f"feature {feature} activation"
    assert np.asarray(photo.get_array()).shape[:2] == (48, 48)  # the picture as the model sees it, under the grid


def test_top_patches_are_the_largest_over_the_dataset(toy, sae):
    examples = data.make_examples(10, seed=11)
    feature = 7
    everything = []
    for i, ex in enumerate(examples):
        inputs = ex.to_inputs(toy)
        grid = feature_grid(toy, feature_acts(toy, sae, inputs, feature), inputs, HOOK)
        everything += [(float(v), i, r, c) for (r, c), v in np.ndenumerate(grid.numpy())]
    everything.sort(key=lambda t: -t[0])
    top = top_patches(toy, sae, examples, feature, k=5, examples_per_forward=4)
    assert [(p.example, p.row, p.col) for p in top.patches] == [t[1:] for t in everything[:5]]
    np.testing.assert_allclose([p.activation for p in top.patches], [t[0] for t in everything[:5]], atol=1e-4)
    assert top.n_patches == 90 and top.n_active == sum(t[0] > 0 for t in everything)
    from mm_lens.viz.tracing import input_image

    assert len({(p.row - min(p.row, 1), p.col - min(p.col, 1)) for p in top.patches}) > 1  # crops cut at edges too
    for p in top.patches:  # each crop holds its patch where its box says, as in the model's view of the picture
        x0, y0, x1, y1 = p.box
        assert (x1 - x0, y1 - y0) == (16, 16) and p.crop.shape[0] in (32, 48) and p.crop.shape[1] in (32, 48)
        view = np.asarray(input_image(toy, examples[p.example].to_inputs(toy)))
        np.testing.assert_array_equal(p.crop[y0:y1, x0:x1], view[16 * p.row:16 * p.row + 16, 16 * p.col:16 * p.col + 16])


def test_crops_keep_the_patch_where_the_box_says():
    from mm_lens.sae.features import _crop

    picture = np.arange(48 * 48 * 3).reshape(48, 48, 3) % 251
    for r, c in [(0, 1), (1, 0), (2, 0), (0, 2), (1, 1)]:
        crop, (x0, y0, x1, y1) = _crop(picture, (3, 3), r, c, context=1)
        np.testing.assert_array_equal(crop[y0:y1, x0:x1], picture[16 * r:16 * r + 16, 16 * c:16 * c + 16])
        assert crop.shape[:2] == (16 * (min(r + 1, 2) - max(r - 1, 0) + 1), 16 * (min(c + 1, 2) - max(c - 1, 0) + 1))


def test_dashboard_is_self_contained_html(toy, sae, tmp_path):
    examples = data.make_examples(10, seed=11)
    page = feature_dashboard(toy, sae, examples, 7, k=4, path=tmp_path / "feature.html")
    assert (tmp_path / "feature.html").read_text() == page
    assert "http" not in page.replace("http://www.w3.org", "")  # nothing fetched from the network
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 + 1  # the top patches and the top example's map
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    top = top_patches(toy, sae, examples, 7, k=4)
    for p in top.patches:
        assert f"{p.activation:.3g} · example {p.example}, patch ({p.row}, {p.col})" in page
    assert f"SAE feature 7 at {HOOK}" in page
