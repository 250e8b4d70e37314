import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import COPY_LAYER, TARGET_WORD, copy_head_model, copy_inputs, patch_position  # noqa: E402

from mm_lens.analysis import logit_lens  # noqa: E402
from mm_lens.analysis.lens import decode  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = copy_head_model()
    return model, copy_inputs(model)


def test_marked_patch_decodes_to_target_at_every_layer(setup):
    model, inputs = setup
    res = logit_lens(model, inputs, positions="image", words=[TARGET_WORD], top_k=3)
    p = patch_position(model, inputs)
    i = res.positions.tolist().index(p)
    target = model.to_single_token(TARGET_WORD)
    assert res.top_tokens.shape == (model.cfg.n_layers + 1, 16, 3)
    assert (res.top_tokens[:, i, 0] == target).all()
    # the marked patch is the one that names the target, at every layer
    assert (res.word_probs[:, :, 0].argmax(-1) == i).all()
    grid = res.patch_grid(0)
    assert grid[2][1] == TARGET_WORD
    assert res.share_naming([TARGET_WORD])[0] == pytest.approx(1 / 16)
    df = res.to_frame()
    assert len(df) == (model.cfg.n_layers + 1) * 16 * 3
    from mm_lens.viz.interaction import plot_logit_lens_grid

    fig = plot_logit_lens_grid(res, layers=[0, 2])
    texts = {(t.get_position()): t.get_text() for t in fig.axes[0].texts}
    assert len(texts) == 16 and texts[(1 + 0.5, 2 + 0.5)] == TARGET_WORD


def test_last_position_reads_target_only_after_the_copy_layer(setup):
    model, inputs = setup
    res = logit_lens(model, inputs, positions="last", words=[TARGET_WORD])
    probs = res.word_probs[:, 0, 0]
    assert (probs[: COPY_LAYER + 1] < 0.2).all()
    assert (probs[COPY_LAYER + 1:] > 0.9).all()


def test_final_layer_matches_model_logits_and_flag(setup):
    model, inputs = setup
    logits, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    res = logit_lens(model, cache, positions="last", layers=[n], inputs=inputs, top_k=4)
    expect_p, expect_t = logits[0, -1].softmax(-1).topk(4)
    assert torch.equal(res.top_tokens[0, 0], expect_t)
    torch.testing.assert_close(res.top_probs[0, 0], expect_p, atol=1e-5, rtol=1e-5)
    h = cache[f"blocks.{n - 1}.hook_resid_post"][0, -1]
    raw = logit_lens(model, cache, positions="last", layers=[n], inputs=inputs, apply_ln_final=False, top_k=1)
    assert int(raw.top_tokens[0, 0, 0]) == int(decode(model, h, apply_ln_final=False).argmax())
    with pytest.raises(ValueError):
        logit_lens(model, cache, positions="last")
