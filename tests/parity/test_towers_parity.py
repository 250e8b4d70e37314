"""LLaVA (``LlavaForConditionalGeneration``) with other text towers (Phi-2, Mistral, Qwen2, Qwen3, Phi-3, Gemma) and
vision towers (SigLIP) against Hugging Face, float32, 1e-4: logits, every residual stream,
attention patterns, vision hidden states, image features, with weight processing off and at its defaults; bf16
within the other families' bounds (Qwen3); a wrong transposition and swapped q/k norms must fail."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import (
    assert_bf16_close_to_hugging_face,
    assert_image_features_match,
    assert_residuals_match,
    assert_vision_states_match,
    transpose_heads_,
)

ATOL = 1e-4
CONFIGS = {
    "phi-clip": dict(text="phi", vision="clip", n_kv_heads=4),
    "phi-gqa-siglip": dict(text="phi", vision="siglip", n_kv_heads=2),
    "llama-siglip-list": dict(text="llama", vision="siglip", vision_feature_layer=[-3, -1]),
    "mistral-clip": dict(text="mistral", vision="clip"),
    "qwen2-siglip": dict(text="qwen2", vision="siglip", n_kv_heads=1),
    "qwen3-clip": dict(text="qwen3", vision="clip", n_kv_heads=2),
    "phi3-clip": dict(text="phi3", vision="clip", n_kv_heads=2),
    "gemma-siglip": dict(text="gemma", vision="siglip", n_kv_heads=1),
}


QK_NORM_CONFIGS = [name for name, config in CONFIGS.items() if config["text"] == "qwen3"]


def _pair(name: str):
    hf, processor = tiny_llava_towers(seed=5, **CONFIGS[name])
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _pair(request.param)


@pytest.fixture(scope="module", params=QK_NORM_CONFIGS)
def qk_norm_pair(request):
    """Towers with q/k norms (Qwen3); the bf16 of the others is checked in tests/parity/test_bf16_parity.py."""
    return _pair(request.param)


def _reference(hf, processor, images, prompts, **kwargs):
    enc = processor(images=images, text=prompts, return_tensors="pt", **kwargs)
    return enc, hf(**enc, output_hidden_states=True, output_attentions=True)


def test_inputs_match_processor(pair):
    hf, processor, model = pair
    image = random_image(1)
    ours = model.to_inputs(image, PROMPT)
    ref = processor(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(ours.input_ids, ref["input_ids"])
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    assert len(ours.positions.image) == model.cfg.n_image_tokens


def test_logits_residuals_patterns(pair):
    hf, processor, model = pair
    image = random_image(1)
    _, out = _reference(hf, processor, image, PROMPT)
    logits, cache = model.run_with_cache(model.to_inputs(image, PROMPT))
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    n = model.cfg.n_layers
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[n], atol=ATOL, rtol=0)
    assert_image_features_match(cache, out)


def test_default_weight_processing_keeps_residuals_patterns_and_log_probs(pair):
    """Loaded with TransformerLens' default processing (ln folded into W_Q/W_K/W_V ahead of any q/k norm,
    unembedding centred): log-probs, patterns and, without centred writes (RMSNorm towers), every residual stream
    still equal Hugging Face's."""
    hf, processor, model = pair
    processed = HookedVLM.from_hf(hf, processor, device="cpu")
    image = random_image(1)
    _, out = _reference(hf, processor, image, PROMPT)
    logits, cache = processed.run_with_cache(processed.to_inputs(image, PROMPT))
    torch.testing.assert_close(logits.log_softmax(-1), out.logits.log_softmax(-1), atol=ATOL, rtol=0)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer], atol=ATOL, rtol=0)
    if model.cfg.normalization_type == "RMS":
        assert_residuals_match(processed, cache, out.hidden_states)


def test_bf16_within_the_bounds_of_the_other_families(qk_norm_pair):
    hf, processor, model = qk_norm_pair
    assert model.cfg.use_qk_norm
    assert_bf16_close_to_hugging_face(hf, processor, [random_image(1), random_image(2, size=(60, 30))],
                                      [PROMPT, "USER: <image>\nwhere is the red square ? ASSISTANT:"])


def test_padded_batch_of_two(pair):
    hf, processor, model = pair
    images = [random_image(1), random_image(2, size=(60, 30))]
    prompts = [PROMPT, "USER: <image>\nwhere is the red square ? answer in a few words . ASSISTANT:"]
    inputs = model.to_inputs(images, prompts)
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, position_ids=model.position_ids(inputs.attention_mask), output_hidden_states=True)
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=ATOL, rtol=0)
    assert_residuals_match(model, cache, out.hidden_states, where=real)


def test_vision_hidden_states(pair):
    hf, processor, model = pair
    pv = model.to_inputs(random_image(4), PROMPT).pixel_values
    ref = hf.model.vision_tower(pv, output_hidden_states=True)
    assert_vision_states_match(model, pv, ref.hidden_states)
    if model.cfg.vision.architecture == "siglip":  # post_layernorm on every position
        torch.testing.assert_close(model.vision_encoder(pv), ref.last_hidden_state, atol=ATOL, rtol=0)
    else:  # CLIP: post_layernorm on the class token is the pooler output
        torch.testing.assert_close(model.vision_encoder(pv)[:, 0], ref.pooler_output, atol=ATOL, rtol=0)


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs(random_image(1), PROMPT)
    processed = copy.deepcopy(model).process_weights()
    torch.testing.assert_close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1), atol=ATOL, rtol=0)


def test_parity_fails_on_swapped_q_and_k_norms(qk_norm_pair):
    """Qwen3: the query norm's weights swapped with the key norm's."""
    hf, processor, model = qk_norm_pair
    broken = copy.deepcopy(model)
    q, k = broken.blocks[0].attn.q_norm.w.data, broken.blocks[0].attn.k_norm.w.data
    q_old = q.clone()
    q.copy_(k)
    k.copy_(q_old)
    image = random_image(1)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


@pytest.mark.parametrize("where", ["text_q", "text_out", "vision_q"])
def test_parity_fails_on_a_wrong_transposition(pair, where):
    hf, processor, model = pair
    broken = copy.deepcopy(model)
    if where == "text_q":
        W = broken.blocks[0].attn.W_Q.data
        transpose_heads_(W)
    elif where == "text_out":
        W = broken.blocks[1].mlp.W_out.data
        W.copy_(W.clone().reshape(W.shape[1], W.shape[0]).T)
    else:
        W = broken.vision_encoder.blocks[0].attn.W_Q.data
        transpose_heads_(W)
    image = random_image(1)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


def test_conversion_is_strict(pair):
    """A missing key and an unexpected key are both named in the error."""
    from mm_lens.conversion import llava
    from mm_lens.conversion.common import load_strict

    hf, processor, model = pair
    source = dict(hf.state_dict())
    missing = next(k for k in source if k.endswith("layers.0.mlp.fc2.weight") and "language_model" in k
                   or k.endswith("layers.0.mlp.down_proj.weight"))
    del source[missing]
    source["model.language_model.layers.0.extra.weight"] = torch.zeros(1)
    rules, ignore = llava.conversion_rules(model.cfg, source)
    with pytest.raises(ValueError) as err:
        load_strict(copy.deepcopy(model), source, rules, ignore, family="test")
    assert missing in str(err.value) and "layers.0.extra.weight" in str(err.value)


def test_every_supported_family_names_an_existing_parity_test():
    from pathlib import Path

    import mm_lens

    rows = mm_lens.supported_architectures()
    root = Path(__file__).resolve().parents[2]
    assert {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "BunnyPhiForCausalLM"} <= {
        r["architecture"] for r in rows}
    for row in rows:
        assert (root / row["parity_test"]).is_file(), row
    towers = {t for r in rows for t in r["text_towers"]}
    assert {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma"} <= towers
