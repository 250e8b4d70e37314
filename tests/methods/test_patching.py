import pandas as pd
import pytest
import torch
from transformer_lens import ActivationCache
from transformer_lens import patching as tl_patching

from mm_lens.analysis import groups
from mm_lens.analysis.corruptions import embedding_noise_hook
from mm_lens.analysis.patching import activation_patch
from mm_lens.testing import random_image
from tests.methods.conftest import PROMPT, padded_pair

TOK_A, TOK_B = 7, 11


def logit_diff(logits):
    return logits[:, -1, TOK_A] - logits[:, -1, TOK_B]


TL_NAMES = {"mlp_post": "post"}  # TransformerLens' short activation names, where they differ from mm_lens' sites


def _group_masks(model, inputs, groups_):
    masks = []
    for g in groups_:
        m = torch.zeros(inputs.shape, dtype=torch.bool)
        for r, pos in enumerate(groups.resolve_batch(model, inputs, g)):
            m[r, pos] = True
        masks.append(m)
    return masks


def tl_groups(model, base, source, row_metric, site, layers, groups_, n_heads=None):
    """TransformerLens' generic_activation_patch over (layer, group[, head]) with a position-group setter written
    here: source activations (an input, or its cache) written into the base run at the group's positions.
    Shape [layer, group(, head)]."""
    source_cache = source if isinstance(source, ActivationCache) else model.run_with_cache(source)[1]
    masks = _group_masks(model, base, groups_)
    heads = range(n_heads) if n_heads else [None]
    index_df = pd.DataFrame([(l, g) + ((h,) if n_heads else ()) for l in layers for g in range(len(masks))
                             for h in heads], columns=["layer", "group"] + (["head"] if n_heads else []))

    def setter(act, index, src):
        m = masks[index[1]]
        if site == "pattern":  # [batch, head, query, key]: the group's query rows
            act.transpose(1, 2)[:, :, index[2]][m] = src.transpose(1, 2)[:, :, index[2]][m]
        elif n_heads:
            act[:, :, index[2]][m] = src[:, :, index[2]][m]
        else:
            act[m] = src[m]
        return act

    out = tl_patching.generic_activation_patch(model, base, source_cache, row_metric, setter, TL_NAMES.get(site, site),
                                               index_df=index_df)
    return out.float().reshape(len(layers), len(masks), *([n_heads] if n_heads else []))


def per_row(model, base, source, metric_at, site, layers, groups_, n_heads=None):
    """:func:`tl_groups` for each row of a batch: ``[..., batch]``."""
    last = base.positions.last_positions
    rows = [tl_groups(model, base, source, lambda lg, r=r: metric_at(lg[r:r + 1, last[r]:last[r] + 1])[0], site,
                      layers, groups_, n_heads) for r in range(base.shape[0])]
    return torch.stack(rows, dim=-1)


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
def test_heads_by_group_equal_transformer_lens(model, pair, site, n_heads):
    """Per-head sites on the fast engine and as full forwards (grouped-query attention: k and v have 2 heads)."""
    clean, corrupted = pair
    kw = dict(hook=site, positions=["text", "image", "last"], heads=True, progress=False)
    fast = activation_patch(model, clean, corrupted, logit_diff, fast=True, **kw)
    slow = activation_patch(model, clean, corrupted, logit_diff, fast=False, **kw)
    assert fast.meta["fast"] and not slow.meta["fast"]
    assert fast.axes == ("layer", "group", "head") and fast.values.shape == (3, 3, n_heads)
    expected = tl_groups(model, corrupted, clean, lambda lg: logit_diff(lg)[0], site, [0, 1, 2],
                         ["text", "image", "last"], n_heads)
    torch.testing.assert_close(fast.values, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow.values, expected, atol=1e-5, rtol=0)
    assert (expected - fast.baseline).abs().max() > 1e-3


@pytest.mark.parametrize("site,tl_fn", [("z", "out"), ("q", "q"), ("k", "k"), ("v", "v"), ("pattern", "pattern")])
def test_heads_at_every_position_equal_transformer_lens(model, pair, site, tl_fn):
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    tl = getattr(tl_patching, f"get_act_patch_attn_head_{tl_fn}_all_pos")
    expected = tl(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0]).float()
    result = activation_patch(model, clean, corrupted, logit_diff, hook=site, positions="all", heads=True,
                              progress=False)
    torch.testing.assert_close(result.values[:, 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlp_post_and_pattern_on_padded_batches_equal_transformer_lens(model, side):
    clean, corrupted = padded_pair(model, side)
    for hook, positions, n_heads in (("mlp_post", ["text", "image"], None), ("pattern", ["image", "last"], 4)):
        kw = dict(hook=hook, positions=positions, layers=[1, 2], progress=False)
        fast = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], fast=True, **kw)
        expected = per_row(model, corrupted, clean, lambda lg: lg[:, -1, TOK_A], hook, [1, 2], positions, n_heads)
        torch.testing.assert_close(fast.per_example, expected, atol=1e-5, rtol=0)
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
    vis = activation_patch(model, clean, corrupted, logit_diff, hook="vision_resid_pre", progress=False)
    # LLaVA reads the second-to-last vision layer (of 2): only block 0 runs, and the default layers say so
    assert vis.values.shape == (1, model.cfg.vision.n_ctx) and vis.labels["layer"] == [0]
    for p in (0, 5):
        def setter(x, src, p=p):
            x[:, p] = src[:, p]
        expected = _hand_loop(model, corrupted, cache, "vision_encoder.blocks.0.hook_resid_pre", setter, logit_diff)
        assert abs(float(vis.values[0, p]) - expected) < 1e-5
    # every vision token at once, before the first block: the clean run's metric
    whole = activation_patch(model, clean, corrupted, logit_diff, hook="vision_resid_pre", positions="all",
                             progress=False)
    assert whole.axes == ("layer", "group") and abs(float(whole.values[0, 0] - logit_diff(model(clean))[0])) < 1e-5


def test_batch_keeps_per_example_and_embedding_noise(model):
    x = model.to_inputs([random_image(0), random_image(3)], [PROMPT, PROMPT])
    noise = embedding_noise_hook(model, x, "image", k=3.0, seed=0)
    res = activation_patch(model, x, x, lambda lg: lg[:, -1, TOK_A], hook="resid_pre", positions=["image", "text"],
                           corrupted_hooks=noise, progress=False)
    assert res.per_example.shape == (model.cfg.n_layers, 2, 2) and res.meta["fast"]
    _, clean_cache = model.run_with_cache(x)
    with model.hooks(fwd_hooks=[noise]):  # TransformerLens patches into whatever run the hooks on the model make
        expected = per_row(model, x, clean_cache, lambda lg: lg[:, -1, TOK_A], "resid_pre", [0, 1, 2], ["image", "text"])
    torch.testing.assert_close(res.per_example, expected, atol=1e-5, rtol=0)
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
    # a site that exists but never runs says why: LLaVA reads the vision tower's second-to-last layer
    with pytest.raises(ValueError, match="never run.*vision tower runs only up to the layer the projector reads"):
        activation_patch(model, clean, corrupted, logit_diff, hook="vision_resid_post", layers=[1], progress=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_transformer_lens(model, side):
    clean, corrupted = padded_pair(model, side)
    _, clean_cache = model.run_with_cache(clean)
    last = corrupted.positions.last_positions
    for hook, tl in (("resid_pre", tl_patching.get_act_patch_resid_pre), ("attn_out", tl_patching.get_act_patch_attn_out)):
        fast = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], hook=hook, positions="each",
                                layers=[0, 2], fast=True, progress=False)
        for r in range(2):
            expected = tl(model, corrupted, clean_cache, lambda lg, r=r: lg[r, last[r], TOK_A]).float()
            torch.testing.assert_close(fast.per_example[..., r], expected[[0, 2]], atol=1e-5, rtol=0)


def test_parallel_blocks_with_partial_rotary_equal_transformer_lens():
    """Phi-2 style towers: attention and MLP in parallel, partial rotary, LayerNorm."""
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_towers
    from tests.methods.conftest import EXACT

    hf, proc = tiny_llava_towers("phi", "clip", text_layers=2, vision_layers=1)
    phi = HookedVLM.from_hf(hf, proc, **EXACT).eval()
    assert phi.cfg.parallel_attn_mlp
    clean = phi.to_inputs(random_image(0), PROMPT)
    corrupted = phi.to_inputs(random_image(1), PROMPT)
    positions = ["image", "text", "last"]
    with pytest.raises(ValueError, match="in parallel in this model, so there is no resid_mid"):
        activation_patch(phi, clean, corrupted, logit_diff, hook="resid_mid", layers=[0], progress=False)
    for hook in ("resid_pre", "mlp_out", "z", "q", "pattern", "mlp_post"):
        n_heads = phi.cfg.n_heads if hook in ("z", "q", "pattern") else None
        fast = activation_patch(phi, clean, corrupted, logit_diff, hook=hook, positions=positions,
                                heads=n_heads is not None, fast=True, progress=False)
        expected = tl_groups(phi, corrupted, clean, lambda lg: logit_diff(lg)[0], hook, [0, 1], positions, n_heads)
        torch.testing.assert_close(fast.values, expected, atol=1e-5, rtol=0)


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
