"""InternVL against Hugging Face, float32, 1e-4: logits, every residual stream, attention patterns, vision hidden
states of every crop, projected image features; one image (tiles and the thumbnail), two images of different tile
grids, a tall image, an image that is one crop, a padded batch; InternViT-300M's options (LayerNorm, mean pooling)
and InternViT-6B's (RMSNorm, q/k norm over all heads, a final LayerNorm), layer scales folded into the output
weights, another feature layer, a Qwen3 language model (InternVL3.5) with weight processing off and at its
defaults; inputs equal the processor's; a transposed weight, a dropped layer scale and swapped q/k norms fail;
bf16 within the other families' bounds; greedy generation equals Hugging Face's."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image
from mm_lens.testing_tiled import INTERNVL_PROMPT, tiny_internvl
from tests.conftest import NO_PROCESSING
from tests.parity.compare import (
    assert_bf16_close_to_hugging_face,
    assert_cache_estimate_exact,
    assert_conversion_strict,
    assert_greedy_generation_matches,
    assert_padded_batch_matches,
    assert_residuals_match,
    close,
    reference_image_features,
    transpose_heads_,
)

PROMPT = INTERNVL_PROMPT
TWO = "USER: <IMG_CONTEXT> and <IMG_CONTEXT>\nwhich picture is the red circle in ? ASSISTANT:"
OTHER = "USER: <IMG_CONTEXT>\nwhere is the red square ? answer in a few words . ASSISTANT:"
CASES = {  # images, prompt, expected tile grids ((0, 0): one crop)
    "wide": ([random_image(1, size=(40, 70))], PROMPT, [(1, 2)]),
    "tall": ([random_image(2, size=(90, 30))], PROMPT, [(3, 1)]),
    "square": ([random_image(3, size=(30, 32))], PROMPT, [(0, 0)]),
    "two images": ([random_image(3, size=(50, 50)), random_image(4, size=(20, 64))], TWO, [(2, 2), (1, 3)]),
}
TOWERS = {
    "300m": dict(),
    "6b": dict(qk_norm=True, norm="rms_norm", mean_pooling=False, attention_bias=False),
    "layer-2": dict(feature_layer=-2, vision_layers=3),
    "qwen3": dict(text="qwen3"),  # InternVL3.5: a Qwen3 language model (q/k norms, head_dim of its own)
}


def _pair(name: str):
    hf, processor = tiny_internvl(seed=2, **TOWERS[name])
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


@pytest.fixture(scope="module", params=list(TOWERS))
def pair(request):
    return _pair(request.param)


@pytest.fixture(scope="module")
def qwen3_pair():
    return _pair("qwen3")


def _sequence_order(features, inputs):
    """Per-crop values (each image's thumbnail first) in the processor's crop order (tiles, then the thumbnail)."""
    out, start = [], 0
    for row in inputs.positions:
        for lay in row.layouts:
            out.append(lay.to_sequence(features[start:start + lay.n_crops]))
            start += lay.n_crops
    return torch.cat(out)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_residuals_patterns_features(pair, case):
    hf, processor, model = pair
    images, prompt, grids = CASES[case]
    enc = processor(images=images, text=[prompt], return_tensors="pt")
    inputs = model.to_inputs(images, prompt)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    close(model(inputs), out.logits)  # the SDPA path
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    close(_sequence_order(cache["vision_projector.hook_out"], inputs).flatten(0, 1), reference_image_features(out))
    row = inputs.positions[0]
    assert [row.tile_grid(i) for i in range(len(images))] == grids
    assert torch.equal(row.image, (enc["input_ids"][0] == hf.config.image_token_id).nonzero().flatten())
    labels = model.to_str_tokens(inputs)
    assert [labels[p] for p in row.named["image_start"]] == ["<img>"] * len(images)
    assert [labels[p] for p in row.named["image_end"]] == ["</img>"] * len(images)
    assert (row.named["image_start"] + 1).tolist() == [int(p[0]) for p in row.images]
    assert labels[row.patch(1, 0)] == "<img 1,0>"
    if grids[0] != (0, 0):
        tr, tc = grids[0][0] - 1, grids[0][1] - 1
        assert labels[int(row.tile(tr, tc)[0, 1])] == f"<img t{tr},{tc} 0,1>"


def test_vision_hidden_states_of_every_crop(pair):
    hf, processor, model = pair
    images, prompt, _ = CASES["two images"]
    enc = processor(images=images, text=[prompt], return_tensors="pt")
    inputs = model.to_inputs(images, prompt)
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision_encoder"))
    ref = hf.model.vision_tower(enc["pixel_values"], output_hidden_states=True)
    v = model.cfg.vision
    n_run = v.n_layers if model.cfg.vision_feature_layer == -1 else model.cfg.vision_feature_layer % (v.n_layers + 1)
    ours = [cache[f"vision_encoder.blocks.{l}.hook_resid_pre"] for l in range(n_run)]
    for a, b in zip(ours, ref.hidden_states[:n_run]):
        close(_sequence_order(a, inputs), b)
    if model.cfg.vision_feature_layer == -1:
        last = cache[f"vision_encoder.blocks.{v.n_layers - 1}.hook_resid_post"]
        close(_sequence_order(last, inputs), ref.hidden_states[-1])
        final = cache["vision_encoder.ln_post.hook_normalized"] if v.has_ln_post else last
        close(_sequence_order(final, inputs), ref.last_hidden_state)


def test_padded_batch(pair):
    hf, processor, model = pair
    images = [[random_image(1, size=(40, 70))], [random_image(2, size=(90, 30)), random_image(3, size=(50, 50))]]
    inputs = assert_padded_batch_matches(hf, processor, model, [i for g in images for i in g], [PROMPT, TWO])
    assert inputs.pixel_values.shape[:2] == (3, 5)  # three images, at most 2x2 tiles + the thumbnail
    span = inputs.positions[1].span("the red circle")
    assert [model.to_str_tokens(inputs)[1][p] for p in span.tolist()] == ["the", "red", "circle"]


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generation_equals_hugging_face_greedy(pair, use_past_kv_cache):
    hf, processor, model = pair
    images = [random_image(1, size=(40, 70)), random_image(2, size=(90, 30))]
    assert_greedy_generation_matches(hf, processor, model, images, [PROMPT, OTHER], 6, use_past_kv_cache)


def test_object_boxes_map_to_every_tile_and_the_thumbnail(pair):
    """A 32x64 image is two 32 px tiles side by side (2x2 tokens of 16 px each) and a thumbnail squeezed to 32x32
    (tokens of 32x16 original px). The box (48, 0, 64, 12) covers the top-right token of tile (0, 1) and of the
    thumbnail."""
    from mm_lens.analysis import groups
    from mm_lens.analysis.groups import resolve

    hf, processor, model = pair
    inputs = model.to_inputs(random_image(6, size=(32, 64)), PROMPT)
    row = inputs.positions[0]
    assert row.tile_grid(0) == (1, 2)
    inside = resolve(model, inputs, groups.object_patches((48, 0, 64, 12))).tolist()
    assert inside == sorted([int(row.tile(0, 1)[0, 1]), row.patch(0, 1)])
    non = resolve(model, inputs, groups.non_object_patches((48, 0, 64, 12))).tolist()
    assert sorted(non + inside) == row.image.tolist()


def test_parity_fails_on_swapped_text_q_and_k_norms(qwen3_pair):
    """InternVL3.5 (Qwen3): the query norm's weights swapped with the key norm's."""
    hf, processor, model = qwen3_pair
    images, prompt, _ = CASES["wide"]
    broken = copy.deepcopy(model)
    attn = broken.blocks[1].attn
    attn.q_norm.w.data, attn.k_norm.w.data = attn.k_norm.w.data.clone(), attn.q_norm.w.data.clone()
    expected = hf(**processor(images=images, text=[prompt], return_tensors="pt")).logits
    assert (broken(broken.to_inputs(images, prompt)) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("where", ["text_q", "vision_q", "projector", "layer_scale"])
def test_parity_fails_on_a_wrong_transposition_or_a_dropped_layer_scale(pair, where):
    hf, processor, model = pair
    images, prompt, _ = CASES["wide"]
    broken = copy.deepcopy(model)
    if where == "projector":
        W = broken.vision_projector.W_out.data
        W.copy_(W.clone().T)
    elif where == "layer_scale":  # the conversion without the fold: lambda_1 of layer 0 undone
        scale = hf.model.vision_tower.encoder.layer[0].lambda_1.data
        broken.vision_encoder.blocks[0].attn.W_O.data.div_(scale)
        broken.vision_encoder.blocks[0].attn.b_O.data.div_(scale)
    else:
        W = (broken.blocks[1] if where == "text_q" else broken.vision_encoder.blocks[0]).attn.W_Q.data
        transpose_heads_(W)
    expected = hf(**processor(images=images, text=[prompt], return_tensors="pt")).logits
    assert (broken(broken.to_inputs(images, prompt)) - expected).abs().max() > 1e-4


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs(*CASES["two images"][:2])
    processed = copy.deepcopy(model).process_weights()
    close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1))


def test_default_weight_processing_keeps_residuals_patterns_and_log_probs(pair):
    """TransformerLens' default processing (RMSNorm text tower: ln folded into W_Q/W_K/W_V ahead of any q/k norm,
    unembedding centred, writes not centred): log-probs, every residual stream and pattern equal Hugging Face's."""
    hf, processor, model = pair
    processed = HookedVLM.from_hf(hf, processor, device="cpu")
    images, prompt, _ = CASES["two images"]
    out = hf(**processor(images=images, text=[prompt], return_tensors="pt"), output_hidden_states=True,
             output_attentions=True)
    logits, cache = processed.run_with_cache(processed.to_inputs(images, prompt))
    close(logits.log_softmax(-1), out.logits.log_softmax(-1))
    assert_residuals_match(processed, cache, out.hidden_states, out.attentions)


def test_cache_estimate_equals_the_cache(pair):
    hf, processor, model = pair
    images = [random_image(1, size=(40, 70)), random_image(2, size=(90, 30))]
    assert_cache_estimate_exact(model, model.to_inputs(images, [PROMPT, OTHER]))


def test_bf16_within_the_bounds_of_the_other_families(pair):
    hf, processor, _ = pair
    assert_bf16_close_to_hugging_face(hf, processor, [random_image(1, size=(40, 70)), random_image(2, size=(90, 30))],
                                      [PROMPT, OTHER])


def test_from_pretrained_folder_with_tied_embeddings(tmp_path):
    """InternVL3-1B ties the unembedding to the embedding (InternVLConfig's default)."""
    hf, processor = tiny_internvl(seed=3, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    model = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    assert model.cfg.original_architecture == "InternVLForConditionalGeneration"
    images, prompt, _ = CASES["tall"]
    close(model(model.to_inputs(images, prompt)), hf(**processor(images=images, text=[prompt],
                                                                   return_tensors="pt")).logits)


def test_conversion_is_strict(pair):
    from mm_lens.conversion import internvl

    hf, processor, model = pair
    source = dict(hf.state_dict())
    assert_conversion_strict(internvl, model, source, "encoder.layer.1.mlp.fc1.bias",
                             "model.multi_modal_projector.extra.weight")
    del source[next(k for k in source if k.endswith("encoder.layer.0.lambda_2"))]
    with pytest.raises(ValueError, match="lambda_2"):
        internvl.conversion_rules(model.cfg, source)


def test_text_only_and_refusals(pair):
    hf, processor, model = pair
    text = "USER: what is the color of the circle ? ASSISTANT:"
    enc = processor(text=text, return_tensors="pt")
    inputs = model.to_inputs(None, text)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    close(model(inputs), hf(**enc).logits)
    with pytest.raises(ValueError, match="video"):
        model.to_inputs(None, "USER: <video> what is this ?")
    with pytest.raises(TypeError, match="PIL images"):
        model.to_inputs(torch.zeros(3, 32, 32), PROMPT)
