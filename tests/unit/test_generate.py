"""Generation with the key/value cache: Hugging Face's greedy tokens, TransformerLens' sampling and hooks."""

import pytest
import torch
from transformer_lens.utilities import sample_logits

import mm_lens
from mm_lens.generation import sample
from mm_lens.testing import tiny_llava
from tests.conftest import NO_PROCESSING, PROMPT

PROMPTS = [PROMPT, "USER: <image>\nwhere is the star ? ASSISTANT:"]


@pytest.fixture(scope="module")
def llava_pair():
    """A tiny random LLaVA whose greedy continuations of PROMPTS vary from step to step."""
    hf, processor = tiny_llava(seed=2)
    return hf, processor, mm_lens.HookedVLM.from_hf(hf, processor, **NO_PROCESSING)


def hf_greedy(hf, processor, images, prompts, n):
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert processor.tokenizer.padding_side == "left"
    return hf.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_single_prompt_equals_hugging_face_greedy(llava_pair, image, use_past_kv_cache):
    hf, processor, model = llava_pair
    ref = hf_greedy(hf, processor, image, PROMPT, 8)
    ours = model.generate(image, PROMPT, max_new_tokens=8, stop_at_eos=False, return_type="tokens",
                          use_past_kv_cache=use_past_kv_cache)
    assert ours.tolist() == ref.tolist()
    assert len(set(ref[0, -8:].tolist())) > 1  # not one token repeated: the steps see their predecessors
    inputs = model.to_inputs(image, PROMPT)
    assert model.generate(inputs, max_new_tokens=8, stop_at_eos=False).tolist() == ref.tolist()  # "input": tokens


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_padded_batch_equals_hugging_face_greedy(llava_pair, image, image2, use_past_kv_cache):
    hf, processor, model = llava_pair
    ref = hf_greedy(hf, processor, [image, image2], PROMPTS, 7)
    inputs = model.to_inputs([image, image2], PROMPTS, padding_side="left")
    assert inputs.padded
    ours = model.generate(inputs, max_new_tokens=7, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    assert ours.tolist() == ref.tolist()
    # right padding gives the same new tokens: positions and masks follow the real tokens
    right = model.to_inputs([image, image2], PROMPTS, padding_side="right")
    new = model.generate(right, max_new_tokens=7, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)[:, -7:]
    assert new.tolist() == ref[:, -7:].tolist()


def test_text_only_and_strings(llava_pair):
    hf, processor, model = llava_pair
    prompt = "USER: what is the color of the circle ? ASSISTANT:"
    ids = processor.tokenizer(prompt, return_tensors="pt")
    ref = hf.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    text = model.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert text == processor.tokenizer.decode(ref[0], skip_special_tokens=True)
    assert model.generate(ids["input_ids"], max_new_tokens=6, stop_at_eos=False).tolist() == ref.tolist()
    texts = model.generate([prompt, "USER: where ? ASSISTANT:"], max_new_tokens=3, stop_at_eos=False)
    assert isinstance(texts, list) and len(texts) == 2 and texts[0].startswith("USER: what is the color")


def test_stop_at_eos_fills_finished_rows(llava_pair, image, image2):
    _, _, model = llava_pair
    inputs = model.to_inputs([image, image2], PROMPTS)
    free = model.generate(inputs, max_new_tokens=6, stop_at_eos=False)[:, -6:]
    eos = int(free[0, 1])  # row 0's second token plays the end of sequence
    out = model.generate(inputs, max_new_tokens=6, eos_token_id=eos)[:, inputs.shape[1]:]
    row0 = free[0].tolist()
    stop0 = row0.index(eos)
    assert out[0].tolist() == row0[:stop0 + 1] + [eos] * (out.shape[1] - stop0 - 1)
    row1 = free[1].tolist()
    if eos in row1:  # stops there too; the run ends when both have stopped
        assert out[1, :row1.index(eos) + 1].tolist() == row1[:row1.index(eos) + 1]
    else:
        assert out[1].tolist() == row1 and out.shape[1] == 6
    single = model.to_inputs(image, PROMPT)
    free1 = model.generate(single, max_new_tokens=6, stop_at_eos=False)[0, single.shape[1]:].tolist()
    if eos in free1:  # one row: generation ends at its end-of-sequence token
        stopped = model.generate(single, max_new_tokens=6, eos_token_id=eos)
        assert stopped[0, single.shape[1]:].tolist() == free1[:free1.index(eos) + 1]


def test_hooks_see_the_new_positions_on_cached_steps(llava_pair, image):
    """As TransformerLens: with the cache, a step's hooks see only the new token; the vision tower runs once."""
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    n = inputs.shape[1]
    seen = []
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape[1])),
             ("vision_encoder.hook_embed", lambda x, hook: seen.append("vision"))]
    for cached, expected in ((True, [n] + [1] * 4), (False, [n + i for i in range(5)])):
        seen.clear()
        with model.hooks(fwd_hooks=hooks):
            model.generate(inputs, max_new_tokens=5, stop_at_eos=False, use_past_kv_cache=cached)
        assert seen == ["vision"] + expected
    # a position-wise hook changes the tokens, the same way with and without the cache
    steer = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x + 3 * steer)]):
        a = model.generate(inputs, max_new_tokens=6, stop_at_eos=False)
        b = model.generate(inputs, max_new_tokens=6, stop_at_eos=False, use_past_kv_cache=False)
    assert a.tolist() == b.tolist()
    assert a.tolist() != model.generate(inputs, max_new_tokens=6, stop_at_eos=False).tolist()


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.6, temperature=1.3),
                                     dict(freq_penalty=2.0, top_k=20), dict(temperature=0.0)])
def test_sampling_follows_transformer_lens(options):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(2))
    for seed in range(20):
        torch.manual_seed(seed)
        ours = sample(logits, tokens, **options)
        torch.manual_seed(seed)
        ref = sample_logits(logits.clone(), tokens=tokens, **options)
        assert ours.tolist() == ref.tolist()


def test_sampled_generation_and_bad_arguments(llava_pair, image):
    _, _, model = llava_pair
    torch.manual_seed(0)
    a = model.generate(image, PROMPT, max_new_tokens=5, do_sample=True, top_k=3, stop_at_eos=False)
    torch.manual_seed(0)
    b = model.generate(image, PROMPT, max_new_tokens=5, do_sample=True, top_k=3, stop_at_eos=False,
                       use_past_kv_cache=False)
    assert isinstance(a, str) and a == b
    with pytest.raises(ValueError, match="return_type"):
        model.generate(image, PROMPT, return_type="embeds")
    with pytest.raises(ValueError, match="top_k"):
        model.generate(image, PROMPT, do_sample=True, top_k=0)


def test_kv_cache_forward_equals_one_forward(llava_pair, image, image2):
    """A padded prompt in two pieces through the cache: the logits of one full forward."""
    from dataclasses import replace

    _, _, model = llava_pair
    inputs = model.to_inputs([image, image2], PROMPTS, padding_side="left")
    full = model(inputs)
    cut = inputs.shape[1] - 3
    cache = mm_lens.KVCache.empty(model.cfg.n_layers)
    head = replace(inputs, input_ids=inputs.input_ids[:, :cut], attention_mask=inputs.attention_mask[:, :cut])
    a = model(head, past_kv_cache=cache)
    b = model(inputs.input_ids[:, cut:], past_kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)
    assert cache.n_pos == inputs.shape[1] and cache[0].keys.shape[2] == inputs.shape[1]
    torch.testing.assert_close(cache.position_ids, model.position_ids(inputs.attention_mask))
