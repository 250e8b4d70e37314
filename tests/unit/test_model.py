"""HookedVLM behaviour: attention paths, weight processing, hooks, positions (generation: test_generate.py)."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from tests.conftest import PROMPT


def test_sdpa_and_eager_agree(llava_pair, image, image2):
    _, _, model = llava_pair
    inputs = model.to_inputs([image, image2], [PROMPT, "USER: <image>\nwhere is the star ? ASSISTANT:"])
    sdpa = model(inputs)
    model.set_attn_implementation("eager")
    try:
        eager = model(inputs)
    finally:
        model.set_attn_implementation("auto")
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], atol=1e-5, rtol=0)


def test_sdpa_is_used_without_pattern_hooks(llava_pair, image):
    _, _, model = llava_pair
    attn = model.blocks[0].attn
    assert not attn.needs_eager()
    _, cache = model.run_with_cache(model.to_inputs(image, PROMPT), names_filter=lambda n: n.endswith("resid_pre"))
    assert "blocks.0.attn.hook_pattern" not in cache and not attn.needs_eager()
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
        assert attn.needs_eager()
    assert not attn.needs_eager()  # hooks removed on exit


@pytest.mark.parametrize("flags", [
    dict(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
])
def test_weight_processing_keeps_log_probs(llava_pair, image, flags):
    hf, processor, plain = llava_pair
    processed = HookedVLM.from_hf(hf, processor, device="cpu", **flags)
    inputs = plain.to_inputs(image, PROMPT)
    torch.testing.assert_close(processed(inputs).log_softmax(-1), plain(inputs).log_softmax(-1), atol=1e-4, rtol=0)
    assert processed.cfg.normalization_type == "RMSPre" and processed.blocks[0].ln1.w is None
    assert processed.vision_encoder.blocks[0].ln1.w is None  # the vision tower's block norms are folded too
    _, c1 = plain.run_with_cache(inputs)
    _, c2 = processed.run_with_cache(inputs)
    torch.testing.assert_close(c1["blocks.2.hook_resid_pre"], c2["blocks.2.hook_resid_pre"], atol=1e-4, rtol=0)


def test_process_weights_on_layernorm_model_keeps_log_probs(llava_pair, image):
    """Centring writing weights applies to LayerNorm models: emulate one by switching the norms."""
    _, _, plain = llava_pair
    model = copy.deepcopy(plain)
    from mm_lens.components.norms import Norm

    for block in model.blocks:
        for name in ("ln1", "ln2"):
            old = getattr(block, name)
            new = Norm(model.cfg.d_model, old.eps, center=True, bias=True)
            new.w.data.copy_(old.w.data)
            if name == "ln1":  # a gated MLP has no gate bias to fold ln2's bias into
                new.b.data.normal_(0, 0.1)
            setattr(block, name, new)
    final = Norm(model.cfg.d_model, model.ln_final.eps, center=True, bias=True)
    final.w.data.copy_(model.ln_final.w.data)
    model.ln_final = final
    for block in model.blocks:
        block.attn.b_O.data.normal_(0, 0.1)
        block.attn._b_V.data.normal_(0, 0.1)
    model.cfg = model.cfg.replace(normalization_type="LN")
    model.setup()
    inputs = model.to_inputs(image, PROMPT)
    before = model(inputs).log_softmax(-1)
    model.process_weights()
    assert model.cfg.normalization_type == "LNPre"
    torch.testing.assert_close(model(inputs).log_softmax(-1), before, atol=1e-4, rtol=0)
    assert float(model.blocks[0].attn.W_O.mean(-1).abs().max()) < 1e-6


def test_loss_counts_text_targets_only(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    logits, loss = model(inputs, return_type="both")
    per_token = model(inputs, return_type="loss", loss_per_token=True)
    ids = inputs.input_ids[0]
    targets = [t for t in range(1, ids.shape[0]) if int(ids[t]) != model.cfg.image_token_id]
    nll = -logits[0].log_softmax(-1)[[t - 1 for t in targets], ids[targets]]
    torch.testing.assert_close(loss, nll.mean())
    assert per_token.shape == (1, ids.shape[0] - 1) and float(per_token[0, inputs.positions.image[1] - 1]) == 0.0


def test_hook_shapes(llava_pair, image):
    _, _, model = llava_pair
    c = model.cfg
    inputs = model.to_inputs(image, PROMPT)
    _, cache = model.run_with_cache(inputs)
    n = inputs.shape[1]
    assert cache["blocks.0.attn.hook_q"].shape == (1, n, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (1, n, c.n_key_value_heads, c.d_head)
    assert cache["blocks.0.attn.hook_rot_k"].shape == (1, n, c.n_key_value_heads, c.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, c.n_heads, n, n)
    assert cache["blocks.0.mlp.hook_post"].shape == (1, n, c.d_mlp)
    assert cache["blocks.0.ln1.hook_scale"].shape == (1, n, 1)
    v = c.vision
    assert cache["vision_encoder.hook_embed"].shape == (1, v.n_ctx, v.d_model)
    assert cache["vision_encoder.blocks.0.hook_resid_pre"].shape == (1, v.n_ctx, v.d_model)
    assert cache["vision_projector.hook_in"].shape == (1, c.n_image_tokens, v.d_model)
    # the vision tower runs only the layers the projector reads (feature layer -2 of 3)
    assert "vision_encoder.blocks.2.hook_resid_post" not in cache
    _, sliced = model.run_with_cache(inputs, pos_slice=-1, names_filter=lambda n: "resid_post" in n)
    torch.testing.assert_close(sliced["blocks.0.hook_resid_post"].reshape(1, -1), cache["blocks.0.hook_resid_post"][:, -1])


def test_positions_and_str_tokens(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    pos = inputs.positions
    rows, cols = pos.grid_shape
    assert (rows, cols) == (4, 4) and len(pos.image) == rows * cols
    assert pos.patch(0, 0) == int(pos.image[0]) and pos.patch(3, 3) == int(pos.image[-1])
    assert pos.patch(1, 2) == int(pos.image[1 * cols + 2])
    labels = model.to_str_tokens(inputs)
    assert labels[pos.patch(1, 2)] == "<img 1,2>"
    span = pos.span("color of the circle")
    assert [labels[p] for p in span.tolist()] == ["color", "of", "the", "circle"]
    assert pos.last == inputs.shape[1] - 1 and labels[pos.last] == "ASSISTANT:"
    assert pos.image_mask.sum() == rows * cols and pos.image_mask[0, pos.image].all()
    assert set(pos.text.tolist()).isdisjoint(pos.image.tolist())


def test_prompt_without_placeholder_gets_one_at_start(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, "what is the color of the circle ?")
    assert inputs.positions.prompt if False else True
    assert inputs.positions[0].prompt.startswith("<image>\n")
    assert int(inputs.positions.image[0]) == 1  # after <s>


def test_image_forms_give_the_same_pixels(llava_pair, image, tmp_path):
    _, _, model = llava_pair
    path = tmp_path / "img.png"
    image.save(path)
    a = model.to_inputs(image, PROMPT).pixel_values
    b = model.to_inputs(str(path), PROMPT).pixel_values
    c = model.to_inputs(image.convert("RGBA"), PROMPT).pixel_values
    d = model.to_inputs(a[0], PROMPT).pixel_values
    for other in (b, c, d):
        torch.testing.assert_close(a, other)
    gray = model.to_inputs(image.convert("L"), PROMPT)
    assert gray.pixel_values.shape == a.shape


def test_text_only_tokens_and_strings(llava_pair):
    _, _, model = llava_pair
    tokens = model.to_tokens("what is the color")
    assert tokens.shape == (1, 5) and int(tokens[0, 0]) == model.tokenizer.bos_token_id
    logits = model(tokens)
    assert logits.shape == (1, 5, model.cfg.d_vocab)
    assert model.to_string(tokens[0, 1:]) == "what is the color"
    assert model.to_str_tokens("what is")[1:] == ["what", "is"]


def test_cache_options_remove_batch_dim_and_device(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    _, cache = model.run_with_cache(inputs, remove_batch_dim=True, device="cpu",
                                    names_filter=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"])
    assert set(cache.keys()) == {"blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"}
    assert cache["blocks.1.hook_resid_pre"].shape == (inputs.shape[1], model.cfg.d_model)
    assert not cache.has_batch_dim
    _, full = model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_pre")
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], full["blocks.1.hook_resid_pre"][0])
