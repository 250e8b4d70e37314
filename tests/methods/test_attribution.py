import pytest
import torch

from mm_lens.analysis.attribution import attribution_patch
from mm_lens.analysis.corruptions import embedding_noise_hook
from mm_lens.analysis.patching import activation_patch
from mm_lens.testing import random_image
from tests.methods.conftest import PROMPT

TOK = 7


def metric(logits):
    return logits[:, -1, TOK]


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("group,k,hooks", [("text", 0.3, ("resid_pre", "attn_out", "z")), ("image", 1.0, ("mlp_out",))])
def test_correlates_with_exact_patching(model, group, k, hooks):
    """The first-order estimate tracks exact patching (ROME-style embedding noise on a group)."""
    x = model.to_inputs(random_image(0), PROMPT)
    noise = embedding_noise_hook(model, x, group, k=k, seed=0)
    for hook in hooks:
        exact = activation_patch(model, x, x, metric, hook=hook, heads=hook == "z", corrupted_hooks=noise,
                                 progress=False)
        approx = attribution_patch(model, x, x, metric, hook=hook, corrupted_hooks=noise)
        assert approx.axes == exact.axes and approx.values.shape == exact.values.shape
        effect = exact.values - exact.baseline
        assert effect.abs().max() > 1e-3
        assert _corr(approx.values, effect) > 0.9, hook


def test_image_corruption_heads_and_groups(model, pair):
    clean, corrupted = pair
    heads = attribution_patch(model, clean, corrupted, metric, hook="z")
    assert heads.axes == ("layer", "pos", "head") and heads.values.shape[-1] == model.cfg.n_heads
    grouped = attribution_patch(model, clean, corrupted, metric, hook="resid_pre", positions=["image", "text"])
    each = attribution_patch(model, clean, corrupted, metric, hook="resid_pre")
    image = clean.positions.image
    torch.testing.assert_close(grouped.values[:, 0], each.values[:, image].sum(1))
    # text positions are identical in both runs: their attribution at layer 0 is exactly zero
    assert float(grouped.values[0, 1].abs()) == 0.0
    # no gradient left on the weights
    assert all(p.grad is None for p in model.parameters())
