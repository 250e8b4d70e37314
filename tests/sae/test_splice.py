"""SAE-Lens SAEs spliced into HookedVLM equal SAE-Lens' own splicing (HookedSAETransformer on the same language
model) and the SAE's own forward written as a plain hook, for every architecture SAE-Lens loads from a folder."""

import pytest
import torch

from mm_lens.sae import rename_hook, resolve_hook_name, translate
from tests.sae.conftest import ARCHITECTURES, HOOK, make_sae, tl_language_model

TEXTS = ["USER: what color is the circle ? ASSISTANT:", "USER: is there a red square ? ASSISTANT: yes"]
SAE_HOOKS = ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"]


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_equals_hooked_sae_transformer_on_the_language_model(toy, use_error_term, exclude):
    """Text only, where the bundled model's language model and TransformerLens' blocks compute the same thing."""
    sae = make_sae("standard")
    twin = tl_language_model(toy)
    tokens = toy.to_tokens(TEXTS)
    assert torch.equal(tokens, twin.to_tokens(TEXTS))
    real = tokens != toy.tokenizer.pad_token_id  # padded on the tokenizer's side (left); padding computes nothing
    assert not real.all()
    kwargs = dict(saes=[sae], use_error_term=use_error_term, exclude_special_tokens=exclude)
    ours, cache = toy.run_with_cache_with_saes(tokens, **kwargs)
    theirs, ref = twin.run_with_cache_with_saes(tokens, **kwargs)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    names = [f"{HOOK}.{h}" for h in SAE_HOOKS + (["hook_sae_error"] if use_error_term else [])]
    assert sorted(n for n in cache.keys() if ".hook_sae_" in n) == sorted(ref_n for ref_n in ref.keys()
                                                                        if ".hook_sae_" in ref_n) == sorted(names)
    for name in names:
        torch.testing.assert_close(cache[name][real], ref[name][real], atol=1e-4, rtol=0)
    without = toy(tokens)
    changed = (ours - without).abs().amax(-1) > 1e-3  # [batch, pos]
    bos = tokens == toy.tokenizer.bos_token_id
    if use_error_term:
        assert not changed[real].any()  # the error term gives back the model's own output
    else:
        assert changed[real & ~bos].all() and bool(changed[bos].any()) != exclude  # BOS left alone when excluded
    assert HOOK in toy.hook_dict and not toy.acts_to_saes  # run_with_*_saes take the SAE out again


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_every_architecture_loaded_from_a_folder_equals_its_own_forward(toy, pair, kind, tmp_path):
    sae = make_sae(kind, folder=tmp_path)
    assert type(sae).__name__.lower().startswith(kind.replace("_", ""))
    clean, _ = pair
    expected, ref = toy.run_with_cache(clean, names_filter=[HOOK])
    expected = toy.run_with_hooks(clean, fwd_hooks=[(HOOK, lambda x, hook: sae(x))])  # SAE-Lens' forward
    toy.add_sae(sae)
    try:
        logits, cache = toy.run_with_cache(clean, names_filter=lambda n: ".hook_sae_" in n)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        assert (sae.encode(ref[HOOK])[0, clean.positions.image] > 0).any()  # features fire on the image
        if kind != "matching_pursuit":  # whose encode calls no hook_sae_acts_post, in SAE-Lens either
            torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(ref[HOOK]), atol=1e-5, rtol=0)
    finally:
        toy.reset_saes()


def test_transcoder_reads_at_its_input_hook_and_writes_at_its_output_hook(toy, pair):
    reads, writes = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"
    sae = make_sae("transcoder", hook=reads, hook_out=writes)
    clean, _ = pair

    def write(x, hook):
        return sae.decode(sae.encode(seen["x"]))

    seen = {}
    expected = toy.run_with_hooks(clean, fwd_hooks=[(reads, lambda x, hook: seen.update(x=x)), (writes, write)])
    with toy.saes([sae]):
        assert toy.acts_to_saes == {reads: sae}
        torch.testing.assert_close(toy(clean), expected, atol=1e-5, rtol=0)
    assert writes in toy.hook_dict and not toy.blocks[1].hook_resid_mid._forward_hooks  # the reading hook is gone too


def test_error_term_lets_feature_edits_through(toy, pair):
    """With the error term the model is unchanged, and ablating a feature changes the output by its decoder
    direction only (SAE-Lens' definition: the error is computed with the SAE's hooks off)."""
    clean, _ = pair
    sae = make_sae("standard")
    base, ref = toy.run_with_cache(clean, names_filter=[HOOK])
    acts = sae.encode(ref[HOOK])
    feature = int(acts[0, clean.positions.image].sum(0).argmax())

    def ablate(x, hook):
        x = x.clone()
        x[..., feature] = 0
        return x

    def by_hand(x, hook):  # the same edit written as the residual minus the feature's decoder contribution
        return x - acts[..., feature:feature + 1] * sae.W_dec[feature]

    expected = toy.run_with_hooks(clean, fwd_hooks=[(HOOK, by_hand)])
    with toy.saes([sae], use_error_term=True):
        torch.testing.assert_close(toy(clean), base, atol=1e-5, rtol=0)
        edited = toy.run_with_hooks(clean, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", ablate)])
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=0)
    assert (edited - base).abs().max() > 1e-2


def test_saes_context_nests_restores_and_leaves_the_model_alone(toy, pair):
    clean, _ = pair
    first, second = make_sae(seed=1), make_sae(seed=2)
    hook_point = toy.blocks[1].hook_resid_post
    keys = set(toy.state_dict())
    toy.add_sae(first)
    try:
        with_first = toy(clean)
        with toy.saes([second]):
            assert toy.acts_to_saes[HOOK] is second
            assert (toy(clean) - with_first).abs().max() > 1e-3
        assert toy.acts_to_saes[HOOK] is first  # the SAE that was there before is back
        torch.testing.assert_close(toy(clean), with_first)
        assert set(toy.state_dict()) == keys  # SAE weights are not model weights (as SAE-Lens)
    finally:
        toy.reset_saes()
    assert toy.blocks[1].hook_resid_post is hook_point and not toy.acts_to_saes


def test_bad_saes_are_errors(toy):
    with pytest.raises(ValueError, match="not a hook point.*nearest"):
        toy.add_sae(make_sae(hook="blocks.1.hook_resid_pots"))
    with pytest.raises(ValueError, match="d_in is 32 but blocks.1.hook_resid_post carries 64"):
        toy.add_sae(make_sae(d_in=32))
    toy.blocks[1].hook_resid_post.add_hook(lambda x, hook: x)
    try:
        with pytest.raises(ValueError, match="has hooks on it"):
            toy.add_sae(make_sae())
    finally:
        toy.reset_hooks()
    with pytest.raises(ValueError, match="no SAE is spliced"):
        toy.reset_saes(HOOK)
    assert not toy.acts_to_saes


@pytest.mark.parametrize("name, expected", [
    ("blocks.1.hook_out", "blocks.1.hook_resid_post"), ("blocks.2.hook_in", "blocks.2.hook_resid_pre"),
    ("blocks.0.ln2.hook_in", "blocks.0.hook_resid_mid"), ("blocks.1.mlp.hook_out", "blocks.1.hook_mlp_out"),
    ("blocks.1.attn.hook_out", "blocks.1.hook_attn_out"), ("blocks.1.mlp.out.hook_in", "blocks.1.mlp.hook_post"),
    ("blocks.1.mlp.in.hook_out", "blocks.1.mlp.hook_pre_linear"), ("blocks.1.attn.o.hook_in", "blocks.1.attn.hook_z"),
    ("vision_encoder.encoder_layers.0.hook_out", "vision_encoder.blocks.0.hook_resid_post"),
    ("model.language_model.layers.2", "blocks.2.hook_resid_post"), ("model.layers.1.mlp", "blocks.1.hook_mlp_out"),
    ("blocks.1.hook_resid_post", None),
])
def test_transformer_bridge_and_hugging_face_names(toy, name, expected):
    """TransformerLens 3's TransformerBridge names (its aliases are mm_lens' names) and Hugging Face module paths."""
    assert translate(name) == expected
    assert resolve_hook_name(toy, name) == (expected or name)


def test_transformer_bridge_aliases_are_the_ones_we_map():
    """The facts behind the table, read from TransformerLens 3's bridge components."""
    pytest.importorskip("transformer_lens.model_bridge.generalized_components.block")
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge
    from transformer_lens.model_bridge.generalized_components.gated_mlp import GatedMLPBridge

    for alias, target in BlockBridge.hook_aliases.items():
        if translate(f"blocks.3.{target}") is not None:
            assert translate(f"blocks.3.{target}") == f"blocks.3.{alias}"
    for alias, target in GatedMLPBridge.hook_aliases.items():
        assert translate(f"blocks.3.mlp.{target}") == f"blocks.3.mlp.{alias}"


def test_sae_trained_under_another_name_splices_after_renaming(toy, pair):
    clean, _ = pair
    sae = make_sae(hook="model.language_model.layers.1")  # a Hugging Face path: read as blocks.1.hook_resid_post
    with toy.saes([sae]):
        via_alias = toy(clean)
        assert list(toy.acts_to_saes) == [HOOK]
    other = rename_hook(make_sae(hook="layers.1.output"), HOOK)
    with toy.saes([other]):
        torch.testing.assert_close(toy(clean), via_alias)


@pytest.mark.parametrize("use_error_term", [False, True])
def test_cache_estimate_counts_the_sae_hooks(toy, pair, use_error_term):
    """run_with_cache's memory check (mm_lens.memory) sees the SAE's hooks in place of the one it replaced."""
    import mm_lens.memory as memory

    clean, _ = pair
    with toy.saes([make_sae(), make_sae("transcoder", hook="blocks.0.hook_resid_mid", hook_out="blocks.0.hook_mlp_out")],
                  use_error_term=use_error_term):
        _, cache = toy.run_with_cache(clean)
        assert memory.hook_shapes(toy, clean) == {name: tuple(t.shape) for name, t in cache.items()}


def test_hooked_sae_transformer_run_functions_accept_the_model(toy):
    """SAE-Lens' HookedSAETransformer.run_with_* called on HookedVLM: they splice through model.saes, so
    exclude_special_tokens is honoured (HookedSAETransformer applies it in its own forward, which HookedVLM has not)."""
    from sae_lens import HookedSAETransformer

    sae = make_sae()
    tokens = toy.to_tokens(TEXTS)
    outputs = []
    for exclude in (False, True):
        ours = toy.run_with_saes(tokens, saes=[sae], exclude_special_tokens=exclude)
        theirs = HookedSAETransformer.run_with_saes(toy, tokens, saes=[sae], exclude_special_tokens=exclude)
        torch.testing.assert_close(theirs, ours)
        _, cache = HookedSAETransformer.run_with_cache_with_saes(toy, tokens, saes=[sae], exclude_special_tokens=exclude)
        assert f"{HOOK}.hook_sae_acts_post" in cache.keys()
        outputs.append(theirs)
    bos = tokens == toy.tokenizer.bos_token_id
    assert (outputs[0] - outputs[1])[bos].abs().max() > 1e-3  # BOS left alone only when asked
    assert not toy.acts_to_saes
