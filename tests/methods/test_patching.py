import pytest
import torch
from transformer_lens import patching as tl_patching

from mm_lens.analysis import groups
from mm_lens.analysis.corruptions import embedding_noise_hook
from mm_lens.analysis.patching import activation_patch
from mm_lens.testing import random_image
from tests.methods.conftest import PROMPT

TOK_A, TOK_B = 7, 11


def logit_diff(logits):
    return logits[:, -1, TOK_A] - logits[:, -1, TOK_B]


def test_resid_pre_equals_transformer_lens(model, pair):
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0])
    result = activation_patch(model, clean, corrupted, logit_diff, progress=False)
    assert result.axes == ("layer", "pos") and result.meta["fast"]
    assert expected.abs().max() > 1e-2  # the patch matters somewhere
    torch.testing.assert_close(result.values, expected.float(), atol=1e-5, rtol=0)
    frame = result.to_frame()
    assert len(frame) == model.cfg.n_layers * clean.shape[1]


def _hand_loop(model, base, src_cache, name, setter, metric):
    def hook(x, hook):
        x = x.clone()
        setter(x, src_cache[name])
        return x
    return float(metric(model.run_with_hooks(base, fwd_hooks=[(name, hook)]))[0])


@pytest.mark.parametrize("site", ["attn_out", "mlp_out", "resid_mid", "resid_post"])
def test_groups_and_noising_match_hand_loop(model, pair, site):
    clean, corrupted = pair
    q = groups.question("what is the color")
    result = activation_patch(model, clean, corrupted, logit_diff, hook=site, positions=["image", q, "last"],
                              layers=[0, 2], direction="noise", progress=False)
    assert result.axes == ("layer", "group") and result.labels["group"][0] == "image"
    _, cache = model.run_with_cache(corrupted)
    for li, layer in enumerate([0, 2]):
        for gi, pos in enumerate([clean.positions.image, q.positions(model, clean), [clean.shape[1] - 1]]):
            def setter(x, src, pos=pos):
                x[:, pos] = src[:, pos]
            name = f"blocks.{layer}.hook_{site}"
            expected = _hand_loop(model, clean, cache, name, setter, logit_diff)
            assert abs(float(result.values[li, gi]) - expected) < 1e-5


@pytest.mark.parametrize("site,n_heads", [("z", 4), ("q", 4), ("k", 2), ("v", 2), ("pattern", 4)])
def test_heads_fast_equals_slow(model, pair, site, n_heads):
    """Per-head sites on the fast engine (grouped-query attention: k and v have 2 heads)."""
    clean, corrupted = pair
    kw = dict(hook=site, positions=["text", "image", "last"], heads=True, progress=False)
    fast = activation_patch(model, clean, corrupted, logit_diff, fast=True, **kw)
    slow = activation_patch(model, clean, corrupted, logit_diff, fast=False, **kw)
    assert fast.meta["fast"] and not slow.meta["fast"]
    assert fast.axes == ("layer", "group", "head") and fast.values.shape == (3, 3, n_heads)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=0)
    assert (fast.values - fast.baseline).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlp_post_and_pattern_fast_on_padded_batches(model, side):
    prompts = [PROMPT, "USER: <image>\nwhat is this ? ASSISTANT:"]
    clean = model.to_inputs([random_image(0), random_image(1)], prompts, padding_side=side)
    corrupted = model.to_inputs([random_image(2), random_image(3)], prompts, padding_side=side)
    for hook, positions in (("mlp_post", "each"), ("pattern", ["image", "last"])):
        kw = dict(hook=hook, positions=positions, layers=[1, 2], progress=False)
        fast = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], fast=True, **kw)
        slow = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], fast=False, **kw)
        torch.testing.assert_close(fast.per_example, slow.per_example, atol=1e-5, rtol=0)
        assert (fast.per_example - fast.baseline).abs().max() > 1e-4, hook


def test_pattern_and_vision_hooks_match_hand_loop(model, pair):
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    res = activation_patch(model, clean, corrupted, logit_diff, hook="pattern", positions="last", layers=[1],
                           progress=False)
    assert res.axes == ("layer", "group", "head")
    last = clean.shape[1] - 1
    for h in range(model.cfg.n_heads):
        def setter(x, src, h=h):
            x[:, h, last] = src[:, h, last]
        expected = _hand_loop(model, corrupted, cache, "blocks.1.attn.hook_pattern", setter, logit_diff)
        assert abs(float(res.values[0, 0, h]) - expected) < 1e-5
    vis = activation_patch(model, clean, corrupted, logit_diff, hook="vision_resid_pre", layers=[0], progress=False)
    assert vis.values.shape == (1, model.cfg.vision.n_ctx)
    for p in (0, 5):
        def setter(x, src, p=p):
            x[:, p] = src[:, p]
        expected = _hand_loop(model, corrupted, cache, "vision_encoder.blocks.0.hook_resid_pre", setter, logit_diff)
        assert abs(float(vis.values[0, p]) - expected) < 1e-5


def test_batch_keeps_per_example_and_embedding_noise(model):
    x = model.to_inputs([random_image(0), random_image(3)], [PROMPT, PROMPT])
    noise = embedding_noise_hook(model, x, "image", k=3.0, seed=0)
    res = activation_patch(model, x, x, lambda lg: lg[:, -1, TOK_A], hook="resid_pre", positions=["image", "text"],
                           corrupted_hooks=noise, progress=False)
    assert res.per_example.shape == (model.cfg.n_layers, 2, 2)
    torch.testing.assert_close(res.values, res.per_example.mean(-1))
    clean_value = model(x)[:, -1, TOK_A]
    # patching the whole image at layer 0 undoes an image-only corruption exactly
    torch.testing.assert_close(res.per_example[0, 0], clean_value, atol=1e-5, rtol=0)
    assert (res.baseline - clean_value).abs().max() > 1e-3


def test_bad_arguments_raise(model, pair):
    clean, corrupted = pair
    with pytest.raises(ValueError, match="unknown hook"):
        activation_patch(model, clean, corrupted, logit_diff, hook="resid", progress=False)
    with pytest.raises(ValueError, match="direction"):
        activation_patch(model, clean, corrupted, logit_diff, direction="up", progress=False)
    with pytest.raises(ValueError, match="heads=True"):
        activation_patch(model, clean, corrupted, logit_diff, hook="mlp_out", heads=True, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        activation_patch(model, clean, corrupted, logit_diff, positions=[[]], progress=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_engine_on_padded_batches(model, side):
    prompts = [PROMPT, "USER: <image>\nwhat is this ? ASSISTANT:"]
    clean = model.to_inputs([random_image(0), random_image(1)], prompts, padding_side=side)
    corrupted = model.to_inputs([random_image(2), random_image(3)], prompts, padding_side=side)
    assert clean.padded
    for hook in ("resid_pre", "attn_out"):
        kw = dict(hook=hook, positions="each", layers=[0, 2], progress=False)
        fast = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], fast=True, **kw)
        slow = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], fast=False, **kw)
        torch.testing.assert_close(fast.per_example, slow.per_example, atol=1e-5, rtol=0)


def test_fast_engine_on_parallel_blocks_with_partial_rotary():
    """Phi-2 style towers: attention and MLP in parallel, partial rotary, LayerNorm."""
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_towers
    from tests.methods.conftest import EXACT

    hf, proc = tiny_llava_towers("phi", "clip", text_layers=2, vision_layers=1)
    phi = HookedVLM.from_hf(hf, proc, **EXACT).eval()
    assert phi.cfg.parallel_attn_mlp
    clean = phi.to_inputs(random_image(0), PROMPT)
    corrupted = phi.to_inputs(random_image(1), PROMPT)
    for hook in ("resid_pre", "mlp_out", "z", "q", "pattern", "mlp_post"):
        kw = dict(hook=hook, positions=["image", "text", "last"], heads=hook in ("z", "q"), progress=False)
        fast = activation_patch(phi, clean, corrupted, logit_diff, fast=True, **kw)
        slow = activation_patch(phi, clean, corrupted, logit_diff, fast=False, **kw)
        torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=0)


def test_normalized_effect_is_the_arena_convention(model, pair):
    """(patched - corrupted) / (clean - corrupted), with clean and corrupted metrics from plain forwards."""
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    patched = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0])
    m_clean, m_corrupted = float(logit_diff(model(clean))[0]), float(logit_diff(model(corrupted))[0])
    assert abs(m_clean - m_corrupted) > 0.1
    expected = (patched - m_corrupted) / (m_clean - m_corrupted)
    result = activation_patch(model, clean, corrupted, logit_diff, progress=False)
    torch.testing.assert_close(result.normalized().values, expected.float(), atol=1e-5, rtol=0)
    # every position at layer 0 restores the clean run exactly; the first position (BOS) does nothing
    whole = activation_patch(model, clean, corrupted, logit_diff, positions="all", layers=[0], progress=False)
    assert abs(float(whole.normalized().values[0, 0]) - 1) < 1e-4
    assert abs(float(result.normalized().values[0, 0])) < 1e-4
    # noising: 1 = no effect, 0 = the corrupted metric
    noised = activation_patch(model, clean, corrupted, logit_diff, positions=["all", 0], layers=[0], direction="noise",
                              progress=False).normalized()
    assert abs(float(noised.values[0, 0])) < 1e-4 and abs(float(noised.values[0, 1]) - 1) < 1e-4


def test_normalized_warns_when_the_corruption_does_not_corrupt(model, pair):
    clean, _ = pair
    result = activation_patch(model, clean, clean, logit_diff, layers=[0], progress=False)
    with pytest.raises(ValueError, match="does not corrupt"), pytest.warns(UserWarning, match="barely changes"):
        result.normalized()
