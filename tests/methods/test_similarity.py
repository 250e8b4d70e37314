import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from constructed import hooked  # noqa: E402

from mm_lens.analysis import modality_similarity  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402

PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"


@pytest.fixture(scope="module")
def model():
    return hooked(seed=5)


def test_image_features_that_are_word_embeddings_score_one_at_layer_zero(model):
    words = model.to_tokens("color circle")[0, 1:]  # two prompt words
    feats = model.W_E.detach()[words].repeat(8, 1)  # 16 patches, each a copy of one of them
    inputs = model.to_inputs(random_image(), PROMPT)
    handle = model.vision_projector.hook_out
    handle.add_hook(lambda out, hook: feats.expand(out.shape[0], -1, -1).clone(), is_permanent=True)
    try:
        res = modality_similarity(model, inputs, layers=[0, 1])
    finally:
        handle.remove_hooks(including_permanent=True)
    assert res.to_embeddings[0] == pytest.approx(1.0, abs=1e-5)
    assert res.to_text_max[0] == pytest.approx(1.0, abs=1e-5)
    assert res.to_embeddings[1] < 1.0


def test_curves_match_a_direct_computation_and_correction(model):
    inputs = model.to_inputs(random_image(3), PROMPT)
    res = modality_similarity(model, inputs, n_pairs=500)
    n = model.cfg.n_layers
    assert res.to_embeddings.shape == (n + 1,)
    _, cache = model.run_with_cache(inputs)
    h = F.normalize(cache["blocks.2.hook_resid_pre"][0], dim=-1)
    image, text = inputs.positions.image, inputs.positions.text[1:]  # BOS left out
    expect_text = (h[image] @ h[text].T).mean()
    expect_emb = (h[image] @ F.normalize(model.W_E, dim=-1).T).max(-1).values.mean()
    assert res.to_text[2] == pytest.approx(float(expect_text), abs=1e-5)
    assert res.to_embeddings[2] == pytest.approx(float(expect_emb), abs=1e-5)
    corr = modality_similarity(model, inputs, n_pairs=500, anisotropy=True)
    torch.testing.assert_close(corr.to_text, res.to_text - res.baseline_text)
    assert corr.anisotropy_corrected and len(res.to_frame()) == n + 1
    assert ((res.baseline_text > -1) & (res.baseline_text < 1)).all()
    from mm_lens.viz.interaction import plot_modality_similarity

    fig = plot_modality_similarity([res, corr], labels=["raw", "corrected"])
    assert list(fig.axes[0].lines[1].get_ydata()) == pytest.approx(corr.to_embeddings.tolist())
