import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import COPY_LAYER, P_COL, P_ROW, copy_head_model, copy_inputs, hooked, patch_position  # noqa: E402

from mm_lens.analysis import attention_contribution, groups  # noqa: E402
from mm_lens.analysis.contribution import contribution_vectors  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402


def test_copy_head_singles_out_the_marked_patch():
    model = copy_head_model()
    inputs = copy_inputs(model)
    res = attention_contribution(model, inputs, source="image", target="last")
    assert res.norms.shape == (model.cfg.n_layers, 1, 16)
    p = patch_position(model, inputs)
    assert res.top_sources(layer=COPY_LAYER, k=1)[0][0] == p
    assert res.norms[COPY_LAYER, 0].max() > 100 * (res.norms.sum() - res.norms[COPY_LAYER, 0].max())
    assert res.source_map(COPY_LAYER).argmax() == P_ROW * 4 + P_COL
    assert len(res.to_frame()) == model.cfg.n_layers * 16
    from mm_lens.viz.tracing import plot_contribution

    fig = plot_contribution(res)
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx(res.per_layer().tolist())
    grid = fig.axes[1].images[0].get_array()
    assert grid.argmax() == P_ROW * 4 + P_COL


def test_vectors_sum_to_the_attention_output_on_a_random_model():
    model = hooked(seed=3)
    inputs = model.to_inputs(random_image(1), "USER: <image>\nwhat is this building ? ASSISTANT:")
    _, cache = model.run_with_cache(inputs)
    everything = torch.arange(inputs.shape[1])
    targets = torch.tensor([inputs.shape[1] - 1, 20])
    for layer in range(model.cfg.n_layers):
        vecs = contribution_vectors(model, cache, layer, everything, targets)
        expected = cache[f"blocks.{layer}.hook_attn_out"][0, targets] - model.blocks[layer].attn.b_O
        torch.testing.assert_close(vecs.sum(1), expected, atol=1e-4, rtol=1e-4)
    res = attention_contribution(model, inputs, source=groups.question("this building"), target="last")
    assert res.per_layer().shape == (model.cfg.n_layers,)
    assert (res.norms > 0).all()
