"""TransformerLens' kept infrastructure runs on HookedVLM across image and text positions."""

import torch
from transformer_lens import patching

from mm_lens import HookedVLM
from mm_lens.analysis import corruptions
from mm_lens.testing import tiny_llava
from tests.conftest import PROMPT


def _processed():
    hf, processor = tiny_llava(seed=5)
    return HookedVLM.from_hf(hf, processor, device="cpu")  # TransformerLens defaults: fold_ln, centring


def test_decompose_resid_sums_to_residual_at_image_and_text(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    _, cache = model.run_with_cache(inputs)
    for pos in (inputs.positions.image, inputs.positions.text):
        for layer, key in ((model.cfg.n_layers, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"),
                           (1, "blocks.1.hook_resid_pre")):
            parts = cache.decompose_resid(layer=layer, pos_slice=pos)
            torch.testing.assert_close(parts.sum(0), cache[key][:, pos], atol=1e-5, rtol=0)
    # the embedding component at image positions is the projected image features
    torch.testing.assert_close(cache["hook_embed"][0, inputs.positions.image], cache["vision_projector.hook_out"][0])


def test_full_resid_decomposition_sums(llava_pair, image):
    _, _, model = llava_pair
    model.set_use_attn_result(True)
    try:
        inputs = model.to_inputs(image, PROMPT)
        _, cache = model.run_with_cache(inputs)
        stack = cache.get_full_resid_decomposition(layer=2, expand_neurons=True)
        torch.testing.assert_close(stack.sum(0), cache["blocks.2.hook_resid_pre"], atol=1e-4, rtol=0)
        attn_sum = cache["blocks.0.attn.hook_result"].sum(-2) + model.blocks[0].attn.b_O
        torch.testing.assert_close(attn_sum, cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)
    finally:
        model.set_use_attn_result(False)


def test_logit_attrs_equal_logit_difference_at_image_position(image):
    model = _processed()
    assert model.cfg.normalization_type == "RMSPre"
    inputs = model.to_inputs(image, PROMPT)
    logits, cache = model.run_with_cache(inputs)
    pos = int(inputs.positions.patch(1, 2))
    a, b = model.to_single_token("red"), model.to_single_token("blue")
    stack = cache.decompose_resid(layer=-1, pos_slice=pos)
    attrs = cache.logit_attrs(stack, tokens=a, incorrect_tokens=b, pos_slice=pos)
    diff = logits[0, pos, a] - logits[0, pos, b]
    torch.testing.assert_close(attrs.sum(0)[0], diff, atol=1e-4, rtol=0)


def test_transformer_lens_patching_runs_on_multimodal_input(llava_pair, image):
    _, _, model = llava_pair
    clean = model.to_inputs(image, PROMPT)
    corrupted = corruptions.pixel_noise(clean, std=2.0, seed=0)
    answer = int(model(clean)[0, -1].argmax())

    def metric(logits):
        return logits[0, -1].log_softmax(-1)[answer]

    _, clean_cache = model.run_with_cache(clean)
    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, clean.shape[1])
    expected = torch.zeros_like(result)
    for layer in range(model.cfg.n_layers):
        for pos in range(clean.shape[1]):
            def hook(act, hook, pos=pos):
                act = act.clone()
                act[:, pos] = clean_cache[hook.name][:, pos]
                return act
            hooks = [(f"blocks.{layer}.hook_resid_pre", hook)]
            expected[layer, pos] = metric(model.run_with_hooks(corrupted, fwd_hooks=hooks))
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    # positions before the image are the same in both runs: patching them changes nothing
    first_image = int(clean.positions.image[0])
    base = metric(model(corrupted))
    torch.testing.assert_close(result[:, :first_image], base.expand(model.cfg.n_layers, first_image), atol=1e-5, rtol=0)
    assert float((result[0, clean.positions.image] - base).abs().max()) > 1e-3


def test_weight_properties_and_factored_matrices(llava_pair):
    _, _, model = llava_pair
    c = model.cfg
    assert model.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert model.W_K.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)  # repeated over GQA groups
    assert model.blocks[0].attn._W_K.shape == (c.n_key_value_heads, c.d_model, c.d_head)
    assert model.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert model.W_gate.shape == model.W_in.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert model.W_out.shape == (c.n_layers, c.d_mlp, c.d_model)
    assert model.W_E.shape == (c.d_vocab, c.d_model) and model.W_U.shape == (c.d_model, c.d_vocab)
    ov = model.OV[0, 1]
    torch.testing.assert_close(ov.AB, model.W_V[0, 1] @ model.W_O[0, 1])
    qk = model.QK[1, 0]
    torch.testing.assert_close(qk.AB, model.W_Q[1, 0] @ model.W_K[1, 0].T)
    v = model.vision_encoder
    assert v.W_Q.shape == (c.vision.n_layers, c.vision.n_heads, c.vision.d_model, c.vision.d_head)
    assert v.OV[0, 0].AB.shape == (c.vision.d_model, c.vision.d_model)


def test_accumulated_bias_and_residual_directions(llava_pair):
    _, _, model = llava_pair
    red = model.to_single_token("red")
    torch.testing.assert_close(model.tokens_to_residual_directions("red"), model.W_U[:, red])
    dirs = model.tokens_to_residual_directions(torch.tensor([red, red]))
    assert dirs.shape == (2, model.cfg.d_model)
    expected = sum(b.attn.b_O + b.mlp.b_out for b in model.blocks[:2])
    torch.testing.assert_close(model.accumulated_bias(2), expected)
