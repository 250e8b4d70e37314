import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import hooked  # noqa: E402

from mm_lens.analysis import multedit  # noqa: E402
from mm_lens.analysis.editing import rank_one_update  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402

# the constraint ends the prompt, so that a tiny random model reads it at the last position
PROMPT = "USER: <image>\nwhat is the color of this building"


@pytest.fixture(scope="module")
def setup():
    model = hooked(seed=4)
    inputs = model.to_inputs(random_image(4), PROMPT)
    para = model.to_inputs(random_image(4), "USER: <image>\nwhich color is this building")
    other = model.to_inputs(random_image(5), "USER: <image>\nwhere is the cat ? ASSISTANT:")
    edit = multedit(model, inputs, target="purple", layer=0, constraint="this building", steps=10,
                    paraphrases=[para], unrelated=[other])
    return model, inputs, edit


def test_rank_one_formula_matches_the_regularised_inverse():
    g = torch.Generator().manual_seed(0)
    W, k, v = torch.randn(6, 4, generator=g), torch.randn(6, generator=g), torch.randn(4, generator=g)
    lam = 0.01
    delta = rank_one_update(W, k, v, lam)
    # column form of the paper: W_col' = (v k^T + lam W_col)(k k^T + lam I)^-1, W_col = W^T
    W_col = W.T
    expected = (torch.outer(v, k) + lam * W_col) @ torch.linalg.inv(torch.outer(k, k) + lam * torch.eye(6))
    torch.testing.assert_close((W + delta).T, expected, atol=1e-4, rtol=1e-4)
    residual = lam / (lam + k @ k) * (v - k @ W)
    torch.testing.assert_close(k @ (W + delta), v - residual, atol=1e-5, rtol=1e-5)


def test_edit_raises_the_target_and_is_reversible(setup):
    model, inputs, edit = setup
    target = model.to_single_token("purple")
    W0 = model.blocks[0].mlp.W_out.detach().clone()
    row = edit.report[edit.report.set == "edit"].iloc[0]
    assert row.p_target_after > 3 * row.p_target_before
    assert edit.losses[-1] < edit.losses[0]
    with edit.applied():
        assert not torch.equal(model.blocks[0].mlp.W_out, W0)
        p = model(inputs)[0, -1].softmax(-1)[target]
        assert float(p) == pytest.approx(row.p_target_after, abs=1e-6)
        # the key now maps to the value
        k = edit.key
        shrink = 0.01 / (0.01 + k @ k)
        expected = edit.value - shrink * (edit.value - k @ W0)
        torch.testing.assert_close(k @ model.blocks[0].mlp.W_out, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.blocks[0].mlp.W_out, W0)
    edit.apply()
    with pytest.raises(ValueError):
        edit.apply()
    edit.undo()
    assert torch.equal(model.blocks[0].mlp.W_out, W0)
    assert set(edit.report.set) == {"edit", "paraphrase", "unrelated"}
    assert len(edit.summary()) == 3
    from mm_lens.viz.tracing import plot_edit

    fig = plot_edit(edit)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:3] == pytest.approx(list(edit.summary().p_target_before))


def test_mlp_output_moves_by_the_key_overlap(setup):
    model, inputs, edit = setup
    _, before = model.run_with_cache(inputs, names_filter=lambda n: n in ("blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post"))
    W0 = model.blocks[0].mlp.W_out.detach()
    with edit.applied():
        _, after = model.run_with_cache(inputs, names_filter=lambda n: n == "blocks.0.hook_mlp_out")
    post = before["blocks.0.mlp.hook_post"][0]
    k = edit.key
    expected = (post @ k)[:, None] / (0.01 + k @ k) * (edit.value - k @ W0)[None]
    torch.testing.assert_close(after["blocks.0.hook_mlp_out"][0] - before["blocks.0.hook_mlp_out"][0], expected,
                               atol=1e-4, rtol=1e-3)
