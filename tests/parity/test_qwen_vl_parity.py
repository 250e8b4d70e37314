"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL against Hugging Face, float32, 1e-4: logits, every residual stream (what each
decoder layer receives), attention patterns, vision hidden states, merged image features, M-RoPE position ids
(``get_rope_index``) and greedy generation; one image, two images in one prompt, non-square images at other
resolutions, a padded batch; inputs equal the processor's; a transposed weight and a swapped M-RoPE axis are
caught; bf16 within bounds. Qwen3-VL's DeepStack has its own checks: :mod:`tests.parity.test_qwen3_vl_parity`."""

import copy
from dataclasses import replace

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from mm_lens import HookedVLM, KVCache
from mm_lens.testing import random_image
from mm_lens.testing_qwen import PROMPT, tiny_qwen_vl
from tests.conftest import NO_PROCESSING
from tests.parity.compare import assert_residuals_match, close, transpose_heads_

SIZES = [(40, 48), (96, 40), (70, 90)]  # (height, width): 2x3 merged tokens, 6x2 (tall), 4x6 (resized to 64x96)
TWO = ("<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
       " what is the color of the circle ? <|im_end|>")
OTHER = "<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> where is the red square ? <|im_end|>"


@pytest.fixture(scope="module", params=["2", "2.5", "3"], ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def pair(request):
    hf, processor = tiny_qwen_vl(request.param, seed=11)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def hugging_face(hf, enc, **kwargs):
    """``(output, residual streams)``: Hugging Face's forward with hidden states and what each decoder layer
    received (Qwen3-VL: after the previous layer's DeepStack addition, which ``hidden_states`` leave out)."""
    seen = {}
    layers = hf.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0]))
               for l, layer in enumerate(layers)]
    try:
        out = hf(**enc, output_hidden_states=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, [seen[l] for l in range(len(layers))]


def reference_image_features(out) -> torch.Tensor:
    return torch.cat(list(out.image_outputs.pooler_output))


@pytest.mark.parametrize("size", SIZES)
def test_logits_residuals_patterns_features(pair, size):
    hf, processor, model = pair
    image = random_image(1, size=size)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out, received = hugging_face(hf, enc, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    assert_residuals_match(model, cache, received, out.attentions)
    close(cache["ln_final.hook_normalized"], out.hidden_states[-1])
    close(cache["vision_projector.hook_out"][0], reference_image_features(out))
    rows, cols = (int(n) // 2 for n in enc["image_grid_thw"][0, 1:])
    assert inputs.positions[0].grids == [(rows, cols)] and len(inputs.positions.image) == rows * cols


def test_two_images_in_one_prompt(pair):
    hf, processor, model = pair
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])]
    enc = processor(images=images, text=TWO, return_tensors="pt")
    inputs = model.to_inputs(images, TWO)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out, received = hugging_face(hf, enc, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    assert_residuals_match(model, cache, received, out.attentions)
    assert inputs.positions[0].grids == [(2, 3), (4, 6)]


def test_vision_hidden_states_of_images_of_two_sizes(pair):
    """Every vision layer of both images (rows padded to the larger one; Qwen2.5-VL's windows as masks) against
    Hugging Face's packed tower (whose Qwen2.5-VL order is window by window)."""
    hf, processor, model = pair
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])]
    enc = processor(images=images, text=TWO, return_tensors="pt")
    inputs = model.to_inputs(images, TWO)
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision_encoder.blocks"))
    ref = hf.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"], output_hidden_states=True).hidden_states
    vc = hf.config.vision_config
    if hasattr(vc, "window_size"):  # back to the processor's order
        index, _ = get_vision_window_index(enc["image_grid_thw"], vc.spatial_merge_size, vc.window_size, vc.patch_size)
        ref = [r.reshape(len(index), -1, r.shape[-1])[torch.argsort(index)].reshape(r.shape) for r in ref]
    counts = [int(t * h * w) for t, h, w in enc["image_grid_thw"]]
    n = model.cfg.vision.n_layers
    ours = [cache[f"vision_encoder.blocks.{l}.hook_resid_pre"] for l in range(n)]
    ours.append(cache[f"vision_encoder.blocks.{n - 1}.hook_resid_post"])
    assert len(ours) == len(ref) == n + 1
    for a, b in zip(ours, ref):
        close(torch.cat([a[i, :k] for i, k in enumerate(counts)]), b)


def test_padded_batch_of_two_and_rope_index(pair):
    hf, processor, model = pair
    images = [random_image(1, size=SIZES[1]), random_image(2, size=SIZES[2])]
    prompts = [PROMPT, OTHER]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    assert torch.equal(inputs.input_ids, enc["input_ids"]) and inputs.padded
    rope, _ = hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                      attention_mask=enc["attention_mask"])
    assert torch.equal(model.input_position_ids(inputs), rope)
    out, received = hugging_face(hf, enc)
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    close(logits[real], out.logits[real])
    assert_residuals_match(model, cache, received, where=real)
    labels = model.to_str_tokens(inputs)
    assert [labels[1][p] for p in inputs.positions[1].span("the red square").tolist()] == ["the", "red", "square"]


def test_text_only(pair):
    hf, processor, model = pair
    text = "<|im_start|> user what is the color of the circle ? <|im_end|>"
    enc = processor(text=text, return_tensors="pt")
    inputs = model.to_inputs(None, text)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    close(model(inputs), hf(**enc).logits)


def test_greedy_generation_equals_hugging_face(pair):
    hf, processor, model = pair
    images = [random_image(3, size=SIZES[0]), random_image(4, size=SIZES[1])]
    prompts = [PROMPT, OTHER]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    expected = hf.generate(**enc, max_new_tokens=5, do_sample=False)
    for cached in (True, False):
        assert torch.equal(model.generate(inputs, max_new_tokens=5, stop_at_eos=False, use_past_kv_cache=cached),
                           expected)
    # the prompt plus the new tokens in one forward, and one token after the prompt's key/value cache, against
    # Hugging Face's forward over the whole sequence (its M-RoPE positions continue after the images)
    n, m = inputs.shape[1], expected.shape[1]
    mask = torch.cat([inputs.attention_mask, torch.ones(2, m - n, dtype=torch.long)], dim=1)
    full = hf(input_ids=expected, attention_mask=mask, pixel_values=enc["pixel_values"],
              image_grid_thw=enc["image_grid_thw"],
              mm_token_type_ids=torch.nn.functional.pad(enc["mm_token_type_ids"], (0, m - n))).logits
    close(model(replace(inputs, input_ids=expected, attention_mask=mask))[:, n - 1:], full[:, n - 1:])
    cache = KVCache.empty(model.cfg.n_layers)
    model(inputs, past_kv_cache=cache)
    close(model(expected[:, n:n + 1], past_kv_cache=cache)[:, 0], full[:, n])


def test_positions_know_each_images_merged_grid(pair):
    from mm_lens.analysis.groups import resolve

    hf, processor, model = pair
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])]
    inputs = model.to_inputs(images, TWO)
    _, cache = model.run_with_cache(inputs, names_filter=["hook_embed", "vision_projector.hook_out"])
    embed, merged = cache["hook_embed"][0], cache["vision_projector.hook_out"]
    row = inputs.positions[0]
    for i, (rows, cols) in enumerate(row.grids):
        for r in range(rows):
            for c in range(cols):
                close(embed[row.patch(r, c, image=i)], merged[i, r * cols + c])
    labels = model.to_str_tokens(inputs)
    assert labels[row.patch(1, 2)] == "<img 1,2>" and labels[row.patch(3, 5, image=1)] == "<img 1:3,5>"
    # <|vision_start|> / <|vision_end|> around each image: the named groups image_start / image_end, not image
    starts, ends = resolve(model, inputs, "image_start"), resolve(model, inputs, "image_end")
    assert [labels[p] for p in starts] == ["<|vision_start|>"] * 2 and [labels[p] for p in ends] == ["<|vision_end|>"] * 2
    assert (starts + 1).tolist() == [int(p[0]) for p in row.images]
    assert (ends - 1).tolist() == [int(p[-1]) for p in row.images]
    assert len(row.image) + len(row.text) == inputs.shape[1]


def test_object_boxes_map_through_the_resize_to_merged_tokens(pair):
    """A 24x32 image is resized to 32x32 (2x2 merged tokens of 16 px): the box (0, 0, 16, 12) covers exactly
    the top-left token; (16, 12, 32, 24) exactly the bottom-right one."""
    from mm_lens.analysis.groups import resolve

    hf, processor, model = pair
    inputs = model.to_inputs(random_image(5, size=(24, 32)), PROMPT)
    row = inputs.positions[0]
    assert row.grids == [(2, 2)]
    assert resolve(model, inputs, groups_object((0, 0, 16, 12))).tolist() == [row.patch(0, 0)]
    assert resolve(model, inputs, groups_object((16, 12, 32, 24))).tolist() == [row.patch(1, 1)]
    non = resolve(model, inputs, groups_object((0, 0, 16, 12), inside=False)).tolist()
    assert non == sorted(row.patch(r, c) for r, c in [(0, 1), (1, 0), (1, 1)])


def groups_object(box, inside=True):
    from mm_lens.analysis import groups

    return groups.object_patches(box) if inside else groups.non_object_patches(box)


def test_video_is_refused(pair):
    _, _, model = pair
    with pytest.raises(ValueError, match="video"):
        model.to_inputs(None, "<|vision_start|><|video_pad|><|vision_end|> what is this ?")


def test_parity_fails_on_a_wrong_transposition_or_a_swapped_axis(pair):
    hf, processor, model = pair
    image = random_image(1, size=SIZES[2])
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    expected = hf(**enc).logits
    broken = copy.deepcopy(model)
    W = broken.vision_encoder.blocks[0].attn.W_Q.data
    transpose_heads_(W)
    assert (broken(inputs) - expected).abs().max() > 1e-4
    ids = model.input_position_ids(inputs)
    swapped = ids[[0, 2, 1]]  # height and width exchanged
    assert (model(inputs, position_ids=swapped) - expected).abs().max() > 1e-4


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs(random_image(1, size=SIZES[1]), PROMPT)
    processed = copy.deepcopy(model).process_weights()
    close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1))


@pytest.mark.parametrize("layout", ["current", "before-4.52"])
def test_from_pretrained_folder(pair, tmp_path, layout):
    """A saved folder streams in; so does the key layout of checkpoints saved before transformers 4.52
    (``visual.*``, ``model.layers.*``), the one the published Qwen-VL checkpoints use."""
    from safetensors.torch import load_file, save_file

    hf, processor, model = pair
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    if layout != "current":
        state = load_file(str(tmp_path / "model.safetensors"))
        old = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
               for k, v in state.items()}
        assert any(k.startswith("visual.") for k in old) and any(k.startswith("model.layers.") for k in old)
        save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    inputs = loaded.to_inputs(random_image(2, size=SIZES[2]), PROMPT)
    close(loaded(inputs), model(inputs))
    assert loaded.cfg.original_architecture == type(hf).__name__


def test_bf16_within_the_bounds_of_the_other_families(pair):
    from tests.parity.test_bf16_parity import assert_bf16_parity

    hf, processor, _ = pair
    model = HookedVLM.from_hf(hf, processor, device="cpu", dtype=torch.bfloat16)  # weights processed in float32
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])]
    prompts = [PROMPT, OTHER]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    bf16_enc = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in enc.items()}
    ours = model(model.to_inputs(images, prompts))
    assert ours.dtype == torch.bfloat16
    assert_bf16_parity(ours, hf_bf16(**bf16_enc).logits, hf(**enc).logits)


def test_cache_estimate_equals_the_cache(pair):
    """mm_lens.memory's estimate (the image pipeline's hook shapes) against a full cache of two images of two sizes."""
    import mm_lens.memory as memory

    hf, processor, model = pair
    inputs = model.to_inputs([random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])], [PROMPT, OTHER])
    _, cache = model.run_with_cache(inputs)
    assert memory.hook_shapes(model, inputs) == {name: tuple(t.shape) for name, t in cache.items()}


def test_prompts_without_a_placeholder_and_pixel_tensors(pair):
    hf, processor, model = pair
    image = random_image(1, size=SIZES[0])
    framed = model.to_inputs(image, "what is the color of the circle ?")
    enc = processor(images=image, text="<|vision_start|><|image_pad|><|vision_end|>what is the color of the circle ?",
                    return_tensors="pt")
    assert torch.equal(framed.input_ids, enc["input_ids"])
    with pytest.raises(TypeError, match="PIL images"):
        model.to_inputs(framed.pixel_values, PROMPT)
    with pytest.raises(ValueError, match="placeholder"):
        model.to_inputs([image, image], PROMPT)


def test_corruptions_see_images(pair):
    """Another image of the same grid, a blanked box (the merged tokens it touches, through the resize) and pixel
    noise act on the resized images that ``pixel_values`` holds."""
    from mm_lens.analysis import corruptions

    hf, processor, model = pair
    image, other = random_image(1, size=SIZES[2]), random_image(7, size=SIZES[2])
    inputs = model.to_inputs(image, PROMPT)
    swapped = corruptions.other_image(model, inputs, [other])
    close(model(swapped), hf(**processor(images=other, text=PROMPT, return_tensors="pt")).logits)
    masked = corruptions.mask_region(model, inputs, (10, 10, 50, 40))  # tokens rows 0-2, cols 0-3 of 4 x 6
    changed = (masked.pixel_values != inputs.pixel_values).any(1)[0]
    cell = model.cfg.vision.merge_cell
    assert bool(changed[:3 * cell, :4 * cell].all()) and not bool(changed[3 * cell:].any() or changed[:, 4 * cell:].any())
    noisy = corruptions.pixel_noise(inputs, std=0.5)
    assert (model(noisy) - model(inputs)).abs().max() > 1e-3


def test_tied_embeddings_load_without_an_lm_head(tmp_path):
    """Qwen2-VL-2B ties its unembedding to the embedding: the saved folder has no ``lm_head.weight``."""
    hf, processor = tiny_qwen_vl("2", seed=2, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    model = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    image = random_image(1, size=SIZES[0])
    close(model(model.to_inputs(image, PROMPT)), hf(**processor(images=image, text=PROMPT, return_tensors="pt")).logits)
