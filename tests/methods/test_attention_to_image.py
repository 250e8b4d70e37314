import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import COPY_LAYER, P_COL, P_ROW, copy_head_model, copy_inputs, patch_position  # noqa: E402

from mm_lens.analysis import attention_to_image  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = copy_head_model()
    return model, copy_inputs(model)


def test_copy_head_puts_all_its_mass_on_the_marked_patch(setup):
    model, inputs = setup
    res = attention_to_image(model, inputs, queries="last")
    assert res.mass.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert res.mass[COPY_LAYER, 0] > 0.99
    pos, r, c, value = res.top_patches(layer=COPY_LAYER, head=0, k=1)[0]
    assert (pos, r, c) == (patch_position(model, inputs), P_ROW, P_COL)
    assert value > 0.99
    grid = res.patch_map(COPY_LAYER, head=0)
    assert grid.shape == (4, 4) and grid.argmax() == P_ROW * 4 + P_COL
    from mm_lens.viz.interaction import plot_attention_to_image
    from mm_lens.viz.tracing import input_image

    seen = input_image(model, inputs)
    assert seen.size == (32, 32)  # the processor's crop
    fig = plot_attention_to_image(res, layer=COPY_LAYER, image=seen)
    assert abs(fig.axes[0].images[0].get_array() - res.mass.T.numpy()).max() < 1e-6
    assert fig.axes[1].images[1].get_array().argmax() == P_ROW * 4 + P_COL  # images[0]: the picture


def test_uniform_heads_give_the_image_its_share_of_keys(setup):
    model, inputs = setup
    res = attention_to_image(model, inputs, queries="last")
    n_keys = inputs.shape[1]  # the last position sees every position
    expected = len(inputs.positions.image) / n_keys
    uniform = res.mass[0]  # layer 0: W_Q = 0 in every head -> uniform attention
    torch.testing.assert_close(uniform, torch.full_like(uniform, expected), atol=1e-5, rtol=0)


def test_text_queries_follow_the_image_and_frames(setup):
    model, inputs = setup
    res = attention_to_image(model, inputs, queries="text", layers=[0, 2])
    assert (res.query_positions > res.image_positions.min()).all()
    n_img = len(inputs.positions.image)
    expected = torch.tensor([n_img / (q + 1) for q in res.query_positions.tolist()]).mean()
    torch.testing.assert_close(res.mass[0], expected.expand(model.cfg.n_heads), atol=1e-5, rtol=0)
    assert len(res.to_frame()) == 2 * model.cfg.n_heads
    assert len(res.patch_frame()) == 2 * model.cfg.n_heads * n_img
