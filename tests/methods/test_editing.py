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


def hand_written_delta(model, inputs, target, layer, pos, steps, lr, clamp, weight_decay=0.001):
    """The published objective and projection, as plain hooks and a plain Adam loop."""
    _, cache = model.run_with_cache(inputs)
    Wk = cache[f"blocks.{layer}.mlp.hook_post"][0, pos] @ model.blocks[layer].mlp.W_out
    delta = torch.zeros(model.cfg.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def add(act, hook):
        act = act.clone()
        act[0, pos] = act[0, pos] + delta
        return act

    with torch.enable_grad():
        for _ in range(steps):
            logits = model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", add)])
            loss = -logits[0, -1].log_softmax(-1)[target] + weight_decay * delta.norm() / Wk.norm() ** 2
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            opt.step()
            with torch.no_grad():
                if delta.norm() > clamp * Wk.norm():
                    delta.mul_(clamp * Wk.norm() / delta.norm())
    return delta.detach()


@pytest.mark.parametrize("published", [True, False])
def test_objective_and_projection_equal_a_hand_written_loop(published):
    model = hooked(seed=4)
    inputs = model.to_inputs(random_image(4), "USER: <image>\nwhat is the color of this building ? ASSISTANT:")
    target = model.to_single_token("purple")
    pos = int(inputs.positions.span("this building")[-1])
    edit = multedit(model, inputs, target="purple", layer=1, constraint="this building", published=published)
    settings = dict(steps=10, lr=0.1, clamp=1e-4) if published else dict(steps=20, lr=0.5, clamp=4.0)
    expected = hand_written_delta(model, inputs, target, 1, pos, **settings)
    W = model.blocks[1].mlp.W_out
    delta = edit.value - edit.key @ W
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    Wk_norm = float((edit.key @ W).norm())
    if published:  # the ball binds: ||delta|| = 1e-4 ||W k|| and the model barely moves
        assert float(delta.norm()) == pytest.approx(1e-4 * Wk_norm, rel=1e-4)
        row = edit.report.iloc[0]
        assert abs(row.p_target_after - row.p_target_before) < 1e-3
    else:
        assert float(delta.norm()) > 0.1 * Wk_norm
    with pytest.raises(ValueError, match="published"):
        multedit(model, inputs, target="purple", layer=1, constraint="this building", published=True, lr=0.5)


def test_a_layer_that_cannot_reach_the_answer_warns():
    model = hooked(seed=4)
    inputs = model.to_inputs(random_image(4), "USER: <image>\nwhat is the color of this building ? ASSISTANT:")
    last_block = model.cfg.n_layers - 1  # its MLP output at "building" never reaches the last position
    with pytest.warns(UserWarning, match="zero gradient"):
        edit = multedit(model, inputs, target="purple", layer=last_block, constraint="this building", steps=2)
    assert float(edit.weight_delta.abs().max()) == 0.0
