"""Gemma 3 (``Gemma3ForConditionalGeneration``) against Hugging Face, float32, 1e-4: logits, every residual stream,
attention patterns, image features, vision hidden states; one image, two images in one prompt, pan-and-scan crops
of wide and tall images, a padded batch; every sequence is longer than the sliding window (8 keys), so local
layers, global layers, their two rotary bases and the bidirectional image groups all matter. Inputs equal the
processor's; a transposed weight fails."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_gemma3
from tests.conftest import NO_PROCESSING
from tests.parity.compare import (
    assert_greedy_generation_matches,
    assert_padded_batch_matches,
    assert_residuals_match,
    assert_vision_states_match,
    close,
    reference_image_features,
    transpose_heads_,
)

ATOL = 1e-4
PROMPT = "USER: <start_of_image>\nwhat is the color of the circle ? ASSISTANT:"
TWO = "USER: <start_of_image> <start_of_image>\nwhich picture is the red circle in ? ASSISTANT:"
CASES = {  # images (one prompt), prompt
    "one image": ([random_image(1)], PROMPT),
    "two images": ([random_image(1), random_image(2, size=(60, 30))], TWO),
}
PAN_AND_SCAN = {  # crops of at least 256 px (the processor's default), so the images are large
    "wide": ([random_image(3, size=(300, 720))], PROMPT),
    "tall": ([random_image(4, size=(560, 290))], PROMPT),
    "square": ([random_image(5, size=(300, 320))], PROMPT),
}


@pytest.fixture(scope="module")
def pair():
    hf, processor = tiny_gemma3(seed=7)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


@pytest.fixture(scope="module")
def pan_pair():
    hf, processor = tiny_gemma3(seed=8, scaled_rope=False)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def _reference(hf, processor, images, prompts, **kwargs):
    enc = processor(images=images, text=prompts, return_tensors="pt", **kwargs)
    return enc, hf(**enc, output_hidden_states=True, output_attentions=True)


def _check_run(hf, processor, model, images, prompt, **processor_kwargs):
    enc, out = _reference(hf, processor, [images], [prompt], **processor_kwargs)
    inputs = model.to_inputs(images, prompt, **processor_kwargs)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    assert inputs.shape[1] > model.cfg.window_size  # the local layers' window matters
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    close(model(inputs), out.logits)  # the SDPA path (nothing hooks the pattern): window and image groups too
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    close(cache["ln_final.hook_normalized"], out.hidden_states[-1])
    close(cache["vision_projector.hook_out"].flatten(0, 1), reference_image_features(out))
    for l in range(model.cfg.n_layers):  # the sandwich norms sit before hook_attn_out / hook_mlp_out (TransformerLens)
        close(cache[f"blocks.{l}.hook_resid_mid"], cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"])
        close(cache[f"blocks.{l}.hook_resid_post"], cache[f"blocks.{l}.hook_resid_mid"] + cache[f"blocks.{l}.hook_mlp_out"])
    return enc, inputs


@pytest.mark.parametrize("case", list(CASES))
def test_logits_residuals_patterns(pair, case):
    hf, processor, model = pair
    enc, inputs = _check_run(hf, processor, model, *CASES[case])
    # the image positions are exactly the processor's image tokens (token_type_ids), markers their own groups
    row = inputs.positions[0]
    assert torch.equal(row.image, enc["token_type_ids"][0].nonzero().flatten())
    boi, eoi = processor.tokenizer.boi_token_id, processor.tokenizer.eoi_token_id
    assert torch.equal(row.named["image_start"], (enc["input_ids"][0] == boi).nonzero().flatten())
    assert torch.equal(row.named["image_end"], (enc["input_ids"][0] == eoi).nonzero().flatten())
    assert len(row.images) == len(CASES[case][0]) and all(len(p) == 4 for p in row.images)
    assert all(int(p[0]) - 1 == int(s) for p, s in zip(row.images, row.named["image_start"]))


@pytest.mark.parametrize("case", list(PAN_AND_SCAN))
def test_pan_and_scan_crops(pan_pair, case):
    """Wide and tall images get crops after their thumbnail (each its own image group); the global rope unscaled."""
    hf, processor, model = pan_pair
    images, prompt = PAN_AND_SCAN[case]
    _, inputs = _check_run(hf, processor, model, images, prompt, do_pan_and_scan=True)
    row = inputs.positions[0]
    lay = row.layouts[0]
    expected = {"wide": (1, 2), "tall": (2, 1), "square": (0, 0)}[case]
    assert lay.tile_grid == expected and lay.n_crops == 1 + expected[0] * expected[1]
    assert len(row.named["image_start"]) == lay.n_crops
    labels = model.to_str_tokens(inputs)
    assert labels[row.patch(1, 0)] == "<img 1,0>"
    if lay.tiles:
        tr, tc = sorted(lay.tiles)[-1]
        assert labels[int(row.tile(tr, tc)[0, 1])] == f"<img t{tr},{tc} 0,1>"


def test_padded_batch(pair):
    hf, processor, model = pair
    images = [[random_image(1)], [random_image(2, size=(60, 30)), random_image(3)]]
    prompts = [PROMPT, "USER: <start_of_image> <start_of_image>\nwhere is the red square ? answer in a few words . "
                       "ASSISTANT:"]
    inputs = assert_padded_batch_matches(hf, processor, model, images, prompts)
    span = inputs.positions[1].span("the red square")
    assert [model.to_str_tokens(inputs)[1][p] for p in span.tolist()] == ["the", "red", "square"]


def test_vision_hidden_states(pair):
    hf, processor, model = pair
    pv = model.to_inputs(random_image(4), PROMPT).pixel_values
    ref = hf.model.vision_tower(pv, output_hidden_states=True)
    assert_vision_states_match(model, pv, ref.hidden_states)
    close(model.vision_encoder(pv), ref.last_hidden_state)


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs([random_image(1), random_image(2)], TWO)
    processed = copy.deepcopy(model).process_weights()
    assert processed.blocks[0].ln1_post.w is not None and processed.blocks[0].attn.q_norm.w is not None
    close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1))


@pytest.mark.parametrize("where", ["text_q", "text_mlp", "vision_q", "projector"])
def test_parity_fails_on_a_wrong_transposition(pair, where):
    hf, processor, model = pair
    broken = copy.deepcopy(model)
    if where == "text_q":
        W = broken.blocks[1].attn.W_Q.data
        transpose_heads_(W)
    elif where == "text_mlp":
        W = broken.blocks[2].mlp.W_out.data
        W.copy_(W.clone().reshape(W.shape[1], W.shape[0]).T)
    elif where == "vision_q":
        W = broken.vision_encoder.blocks[0].attn.W_Q.data
        transpose_heads_(W)
    else:
        W = broken.vision_projector.W_in.data
        W.copy_(W.clone().reshape(W.shape[1], W.shape[0]).T)
    images = [random_image(1)]
    enc = processor(images=[images], text=[PROMPT], return_tensors="pt")
    assert (broken(broken.to_inputs(images, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


def test_without_image_groups_or_window_parity_fails(pair):
    """Both mask ingredients matter on these inputs (the tests above would catch either one dropped)."""
    hf, processor, model = pair
    images, prompt = CASES["two images"]
    enc = processor(images=[images], text=[prompt], return_tensors="pt")
    ref = hf(**enc).logits
    inputs = model.to_inputs(images, prompt)
    no_groups = copy.deepcopy(model)
    no_groups.cfg = no_groups.cfg.replace(bidirectional_image_attention=False)
    assert (no_groups(inputs) - ref).abs().max() > ATOL
    no_window = copy.deepcopy(model)
    for block in no_window.blocks:
        block.attn.window = None
    assert (no_window(inputs) - ref).abs().max() > ATOL


def test_config_translation(pair):
    hf, processor, model = pair
    cfg, tc = model.cfg, hf.config.text_config
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.bidirectional_image_attention
    assert cfg.attn_types == tuple("local" if t == "sliding_attention" else "global" for t in tc.layer_types)
    assert [b.attn.window for b in model.blocks] == [8, None, 8, None]
    assert cfg.rotary_base == 1e6 and cfg.rotary_base_local == 1e4
    assert cfg.attn_scale == pytest.approx(24**0.5) and cfg.n_image_tokens == 4
    torch.testing.assert_close(model.rotary.inv_freq, hf.model.language_model.rotary_emb.full_attention_inv_freq)


def test_from_pretrained_folder(pair, tmp_path):
    hf, processor, model = pair
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    assert loaded.cfg.original_architecture == "Gemma3ForConditionalGeneration"
    inputs = loaded.to_inputs([random_image(1), random_image(2)], TWO)
    close(loaded(inputs), model(inputs))


def test_conversion_is_strict(pair):
    from mm_lens.conversion import gemma3
    from mm_lens.conversion.common import load_strict

    hf, processor, model = pair
    source = dict(hf.state_dict())
    missing = next(k for k in source if k.endswith("layers.1.self_attn.k_norm.weight"))
    del source[missing]
    source["model.language_model.layers.0.extra.weight"] = torch.zeros(1)
    rules, ignore = gemma3.conversion_rules(model.cfg, source, True)
    with pytest.raises(ValueError) as err:
        load_strict(copy.deepcopy(model), source, rules, ignore, family="test")
    assert missing in str(err.value) and "layers.0.extra.weight" in str(err.value)


def test_knockout_inside_one_image_equals_a_hand_written_mask(pair):
    """Attention knockout of image -> image inside the first image (every layer) against Hugging Face's model
    given the same attention written by hand: causal OR same image, AND the window on local layers, minus the
    knocked-out edges (Hugging Face's ``token_type_ids`` blocks, as its masks are built)."""
    from mm_lens.analysis.knockout import knockout_hooks

    hf, processor, model = pair
    images, prompt = CASES["two images"]
    enc = processor(images=[images], text=[prompt], return_tensors="pt")
    inputs = model.to_inputs(images, prompt)
    first, second = inputs.positions[0].images
    ours = model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(model, inputs, source=first, target=first))
    n = inputs.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same_image = torch.zeros(n, n, dtype=torch.bool)
    for block in (first, second):
        same_image[block[:, None], block[None, :]] = True
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[first[:, None], first[None, :]] = True
    full = (k <= q) | same_image
    sliding = full & (k > q - model.cfg.window_size)
    masks = {name: torch.zeros(n, n).masked_fill(~(allowed & ~blocked), float("-inf"))[None, None]
             for name, allowed in (("full_attention", full), ("sliding_attention", sliding))}
    ref = hf(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], attention_mask=masks).logits
    close(ours, ref)
    assert (ours - model(inputs)).abs().max() > ATOL  # the knockout changed something


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generation_equals_hugging_face_greedy(pair, use_past_kv_cache):
    """A padded batch (one image; two images), past the sliding window, cached and uncached."""
    hf, processor, model = pair
    images = [[random_image(1)], [random_image(2, size=(60, 30)), random_image(3)]]
    assert_greedy_generation_matches(hf, processor, model, images, [PROMPT, TWO], 10, use_past_kv_cache)


def test_cache_in_two_pieces(pair):
    """A prompt in two cached forwards equals one forward when the cut falls between images (the second piece's
    image positions form a new group); a cut inside an image is refused (its first tokens would miss its last)."""
    from dataclasses import replace

    import mm_lens

    hf, processor, model = pair
    inputs = model.to_inputs(*CASES["two images"])
    features = model.image_features(inputs.pixel_values).flatten(0, 1)

    def pieces(cut):
        cache = mm_lens.KVCache.empty(model.cfg.n_layers)
        n_first = int(inputs.positions.image_mask[0, :cut].sum())
        head = replace(inputs, input_ids=inputs.input_ids[:, :cut], attention_mask=inputs.attention_mask[:, :cut])
        tail = replace(inputs, input_ids=inputs.input_ids[:, cut:], attention_mask=inputs.attention_mask[:, cut:])
        first = model(head, image_features=features[:n_first], past_kv_cache=cache)
        return torch.cat([first, model(tail, image_features=features[n_first:], past_kv_cache=cache)], 1)

    second = inputs.positions[0].images[1]
    close(pieces(int(second[0])), model(inputs))
    with pytest.raises(ValueError, match="one forward"):
        pieces(int(second[2]))
