"""Patching with an SAE spliced in, and patching its features: on the fast engine, equal to TransformerLens'
patching functions under the same SAE and to the feature patch written as plain hooks."""

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

import mm_lens
from mm_lens.analysis import activation_patch
from mm_lens.analysis.groups import resolve_batch
from tests.sae.conftest import HOOK, make_sae

ACTS = f"{HOOK}.hook_sae_acts_post"


def tl_resid_pre(model, clean, corrupted, metric):
    _, clean_cache = model.run_with_cache(clean)
    return tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: metric(lg)[0]).float()


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_resid_pre_with_an_sae_spliced_equals_transformer_lens_on_the_engine(toy, pair, metric, kind):
    clean, corrupted = pair
    plain = activation_patch(toy, clean, corrupted, metric, progress=False).values
    with toy.saes([make_sae(kind)]):
        expected = tl_resid_pre(toy, clean, corrupted, metric)
        result = activation_patch(toy, clean, corrupted, metric, fast=True, progress=False)
    assert result.meta["fast"] and result.meta["fast_layers"] == [0, 1, 2]
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
    assert (expected - plain).abs().max() > 1e-2  # the SAE changes what patching finds


def temporal_sae():
    """SAE-Lens' TemporalSAE: it attends over earlier positions, so it is not exact on a suffix of them."""
    from sae_lens import TemporalSAE, TemporalSAEConfig

    cfg = TemporalSAEConfig(d_in=64, d_sae=48, n_heads=4, bottleneck_factor=4, kval_topk=6)
    cfg.metadata.hook_name = HOOK
    torch.manual_seed(0)
    return TemporalSAE(cfg)


@pytest.mark.parametrize("case", ["exclude_special_tokens", "temporal"])
def test_splices_the_engine_cannot_honour_fall_back(toy, pair, metric, case):
    """Leaving special tokens alone reads the token ids of the whole input, TemporalSAE attends over earlier
    positions: full forwards, the same answer as TransformerLens."""
    clean, corrupted = pair
    sae, exclude = (make_sae(), True) if case == "exclude_special_tokens" else (temporal_sae(), False)
    with toy.saes([sae], exclude_special_tokens=exclude):
        expected = tl_resid_pre(toy, clean, corrupted, metric)
        result = activation_patch(toy, clean, corrupted, metric, progress=False)
        assert result.meta["fast_layers"] == [2]  # a resumed run from layer 2 does not reach the SAE in block 1
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="blocks.1.hook_resid_post: replaced by SAESplice"):
            activation_patch(toy, clean, corrupted, metric, fast=True, progress=False)


def test_hooks_on_the_sae_features_count_as_hooks(toy, pair, metric):
    clean, corrupted = pair
    with toy.saes([make_sae()]):  # a hook of the user's on the SAE's features is a hook like any other
        toy.add_hook(ACTS, lambda x, hook: x * 0.5)
        try:
            with pytest.raises(ValueError, match="hook_sae_acts_post"):
                activation_patch(toy, clean, corrupted, metric, fast=True, progress=False)
            toy.reset_hooks()
            toy.add_hook(ACTS, mm_lens.positionwise(lambda x, hook: x * 0.5))
            expected = tl_resid_pre(toy, clean, corrupted, metric)
            result = activation_patch(toy, clean, corrupted, metric, fast=True, progress=False)
            torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
        finally:
            toy.reset_hooks()


def feature_patch_by_hand(model, clean, corrupted, metric, features, groups):
    """Clean feature activations written into the corrupted run, one feature at a group's positions at a time,
    as plain hooks on full forwards: ``[feature, group]``."""
    _, clean_cache = model.run_with_cache(clean, names_filter=[ACTS])
    out = torch.zeros(len(features), len(groups))
    for gi, group in enumerate(groups):
        pos = resolve_batch(model, corrupted, group)[0]
        for fi, f in enumerate(features):
            def hook(x, hook, f=f, pos=pos):
                x = x.clone()
                x[0, pos, f] = clean_cache[ACTS][0, pos, f]
                return x
            out[fi, gi] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(ACTS, hook)]))[0]
    return out


@pytest.mark.parametrize("use_error_term", [False, True])
def test_feature_patching_per_group_equals_plain_hooks(toy, pair, metric, use_error_term):
    clean, corrupted = pair
    groups = ["image", "object", "text", "last"]
    with toy.saes([make_sae()], use_error_term=use_error_term):
        result = activation_patch(toy, clean, corrupted, metric, hook="sae_acts", positions=groups, fast=True,
                                  progress=False)
        assert result.axes == ("feature", "group") and result.label("group") == groups
        assert result.meta["fast"] and result.meta["sae"] == ACTS
        expected = feature_patch_by_hand(toy, clean, corrupted, metric, result.label("feature"), groups)
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
        # the default features: those that differ between the runs somewhere in the groups; the rest change nothing
        _, a = toy.run_with_cache(clean, names_filter=[ACTS])
        _, b = toy.run_with_cache(corrupted, names_filter=[ACTS])
        differ = ((a[ACTS] - b[ACTS])[0] != 0).any(0).nonzero().flatten().tolist()
        assert result.label("feature") == differ and 0 < len(differ) < 48
        frame = result.to_frame()
        assert len(frame) == len(differ) * len(groups) and isinstance(frame, pd.DataFrame)
    assert (result.values[:, 1]).abs().max() > 1e-2  # the object's patch carries features that matter


def test_feature_patching_each_position_and_named_features(toy, pair, metric):
    clean, corrupted = pair
    sae = make_sae()
    with toy.saes([sae]):
        fast = activation_patch(toy, clean, corrupted, metric, hook="sae_acts", sae=sae, features=[0, 3],
                                positions="each", progress=False)
        full = activation_patch(toy, clean, corrupted, metric, hook="sae_acts", sae=HOOK, features=[0, 3],
                                positions="each", fast=False, progress=False)
    assert fast.axes == ("feature", "pos") and fast.values.shape == (2, clean.shape[1])
    assert fast.meta["fast"] and not full.meta["fast"]
    torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs one SAE spliced in"):
        activation_patch(toy, clean, corrupted, metric, hook="sae_acts", progress=False)
