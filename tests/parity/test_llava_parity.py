"""LLaVA-1.5 layout against Hugging Face's LlavaForConditionalGeneration, float32, 1e-4."""

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import (
    assert_image_features_match,
    assert_residuals_match,
    assert_vision_states_match,
    transpose_heads_,
)

ATOL = 1e-4
CONFIGS = {
    "gqa-layer-2-default": dict(vision_feature_layer=-2, strategy="default", n_kv_heads=2),
    "mha-layer-list-default": dict(vision_feature_layer=[-3, -1], strategy="default", n_kv_heads=4),
    "gqa-layer-1-full": dict(vision_feature_layer=-1, strategy="full", n_kv_heads=1),
}


def _pair(**kwargs):
    hf, processor = tiny_llava(seed=3, **kwargs)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def _hf_run(hf, enc, position_ids=None):
    return hf(**enc, position_ids=position_ids, output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _pair(**CONFIGS[request.param])


def test_inputs_match_processor(pair):
    hf, processor, model = pair
    image = random_image(1)
    ours = model.to_inputs(image, PROMPT)
    ref = processor(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])
    assert torch.allclose(ours.pixel_values, ref["pixel_values"])


def test_batch1_logits_residuals_patterns(pair):
    hf, processor, model = pair
    image = random_image(1)
    ref = processor(images=image, text=PROMPT, return_tensors="pt")
    out = _hf_run(hf, ref)
    logits, cache = model.run_with_cache(model.to_inputs(image, PROMPT))
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    n = model.cfg.n_layers
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[n], atol=ATOL, rtol=0)
    assert_image_features_match(cache, out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two(pair, side):
    hf, processor, model = pair
    images = [random_image(1), random_image(2, size=(60, 30))]
    prompts = [PROMPT, "USER: <image>\nwhere is the red square ? answer in a few words . ASSISTANT:"]
    processor.tokenizer.padding_side = side
    try:
        ref = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    inputs = model.to_inputs(images, prompts, padding_side=side)
    assert torch.equal(inputs.input_ids, ref["input_ids"]) and torch.equal(inputs.attention_mask, ref["attention_mask"])
    out = _hf_run(hf, ref, position_ids=model.position_ids(inputs.attention_mask))
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=ATOL, rtol=0)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"][real], out.hidden_states[layer][real],
                                   atol=ATOL, rtol=0)
        ours_p = cache[f"blocks.{layer}.attn.hook_pattern"]
        for b in range(2):
            q = real[b].nonzero().flatten()
            torch.testing.assert_close(ours_p[b][:, q][:, :, q], out.attentions[layer][b][:, q][:, :, q],
                                       atol=ATOL, rtol=0)
    lasts = inputs.positions.last_positions.tolist()
    assert lasts == ([inputs.shape[1] - 1] * 2 if side == "left" else [int(m.sum()) - 1 for m in inputs.attention_mask])
    assert len(inputs.positions[1].image) == model.cfg.n_image_tokens


def test_vision_hidden_states_and_pooler(pair):
    hf, processor, model = pair
    pv = model.to_inputs(random_image(4), PROMPT).pixel_values
    ref = hf.model.vision_tower(pv, output_hidden_states=True)
    assert_vision_states_match(model, pv, ref.hidden_states)
    full = model.vision_encoder(pv)
    torch.testing.assert_close(full[:, 0], ref.pooler_output, atol=ATOL, rtol=0)


def test_image_features(pair):
    hf, processor, model = pair
    pv = model.to_inputs(random_image(5), PROMPT).pixel_values
    ref = hf.get_image_features(pixel_values=pv).pooler_output
    ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    torch.testing.assert_close(model.image_features(pv), ref.reshape(model.image_features(pv).shape), atol=ATOL, rtol=0)


def test_parity_fails_on_a_wrong_transposition(pair):
    """The parity check above is sharp: one transposed head split breaks it."""
    hf, processor, model = pair
    import copy

    broken = copy.deepcopy(model)
    W = broken.blocks[0].attn.W_Q.data
    transpose_heads_(W)
    image = random_image(1)
    ref = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**ref).logits).abs().max() > ATOL
