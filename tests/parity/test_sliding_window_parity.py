"""Sliding-window attention (Mistral and Phi-3: every layer; Qwen2: the layers after ``max_window_layers``) on
sequences longer than the window, against Hugging Face in float32 at 1e-4: logits, residual streams and patterns
(eager and SDPA paths), a padded batch, the key/value cache (a prompt in two pieces, generation past the window),
and the fast patching engine against TransformerLens' patching (suffix queries over a frozen prefix)."""

import pytest
import torch
from transformer_lens import patching as tl_patching

import mm_lens
from mm_lens.analysis import activation_patch, corruptions
from mm_lens.testing import random_image, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import (
    assert_greedy_generation_matches,
    assert_padded_batch_matches,
    assert_residuals_match,
    close,
)

WINDOW = 12
TOWERS = {
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
PROMPTS = [PROMPT, "USER: <image>\nwhere is the red square ? answer in a few words . ASSISTANT:"]


@pytest.fixture(scope="module", params=list(TOWERS))
def pair(request):
    hf, processor = tiny_llava_towers(request.param, "clip", seed=4, text_config=TOWERS[request.param])
    hf.set_attn_implementation("eager")
    return hf, processor, mm_lens.HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def test_windows_per_layer(pair):
    hf, _, model = pair
    expected = [WINDOW] * 3 if hf.config.text_config.model_type != "qwen2" else [None, WINDOW, WINDOW]
    assert [b.attn.window for b in model.blocks] == expected


def test_logits_residuals_patterns(pair, image):
    hf, processor, model = pair
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 2 * WINDOW
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    inputs = model.to_inputs(image, PROMPT)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    close(model(inputs), out.logits)  # SDPA path
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    blind = model.cfg.window_size  # a local layer's pattern is 0 more than WINDOW - 1 keys back
    local = next(l for l, b in enumerate(model.blocks) if b.attn.window)
    pattern = cache[f"blocks.{local}.attn.hook_pattern"][0, :, -1]
    assert bool((pattern[:, : inputs.shape[1] - blind] == 0).all()) and bool((pattern[:, -blind:] > 0).all())


def test_padded_batch(pair, image, image2):
    assert_padded_batch_matches(*pair, [image, image2], PROMPTS)


def test_cache_in_two_pieces_equals_one_forward(pair, image, image2):
    from dataclasses import replace

    _, _, model = pair
    inputs = model.to_inputs([image, image2], PROMPTS)
    cut = inputs.shape[1] - WINDOW + 3  # the new queries' windows reach back into the cached keys
    cache = mm_lens.KVCache.empty(model.cfg.n_layers)
    head = replace(inputs, input_ids=inputs.input_ids[:, :cut], attention_mask=inputs.attention_mask[:, :cut])
    torch.testing.assert_close(torch.cat([model(head, past_kv_cache=cache),
                                          model(inputs.input_ids[:, cut:], past_kv_cache=cache)], 1),
                               model(inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generation_past_the_window_equals_hugging_face_greedy(pair, image, image2, use_past_kv_cache):
    assert_greedy_generation_matches(*pair, [image, image2], PROMPTS, WINDOW + 2, use_past_kv_cache)


def test_fast_patching_equals_transformer_lens(pair, image):
    """The engine resumes on suffix positions over a frozen key/value prefix; its queries' windows must start in
    the prefix. Reference: TransformerLens' full-forward patching."""
    _, _, model = pair
    clean = model.to_inputs(image, PROMPT)
    corrupt = corruptions.other_image(model, clean, [random_image(9)])
    answer = int(model(clean)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, answer].mean()

    _, clean_cache = model.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    result = activation_patch(model, clean, corrupt, metric, fast=True, progress=False)
    assert result.meta["fast"]
    torch.testing.assert_close(result.values, expected.float(), atol=1e-4, rtol=0)
