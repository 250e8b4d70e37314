"""Idefics3 and SmolVLM against Hugging Face, float32, 1e-4: logits, every residual stream, attention patterns,
vision hidden states of every crop, projected image features; one image (tiles and the global image), two images
of different tile grids in one prompt, a tall image, an image that is not split, a padded batch; inputs equal the
processor's; NaViT-style position buckets; a transposed weight fails; bf16 within the other families' bounds;
greedy generation equals Hugging Face's."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.components.idefics_pipeline import bucket_positions
from mm_lens.testing import random_image
from mm_lens.testing_tiled import IDEFICS3_PROMPT, tiny_idefics3
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

PROMPT = IDEFICS3_PROMPT
TWO = "USER: <image> and <image>\nwhich picture is the red circle in ? <end_of_utterance>\nASSISTANT:"
OTHER = "USER: <image>\nwhere is the red square ? answer in a few words . <end_of_utterance>\nASSISTANT:"
CASES = {  # images, prompt, expected tile grids
    "wide": ([random_image(1, size=(40, 70))], PROMPT, [(2, 3)]),
    "tall": ([random_image(2, size=(90, 30))], PROMPT, [(3, 1)]),
    "two images": ([random_image(3, size=(50, 50)), random_image(4, size=(20, 64))], TWO, [(3, 3), (1, 3)]),
}


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def pair(request):
    hf, processor = tiny_idefics3(request.param, seed=1)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def _run(hf, processor, model, images, prompt):
    enc = processor(images=[images], text=[prompt], return_tensors="pt")
    inputs = model.to_inputs(images, prompt)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    close(model(inputs), out.logits)  # the SDPA path
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    close(cache["ln_final.hook_normalized"], out.hidden_states[-1])
    return enc, inputs, out, cache


def _sequence_order(features, inputs):
    """``vision_projector.hook_out`` ([n_crops, tokens, d], each image's global image first) in the processor's
    crop order (tiles, then the global image), flattened."""
    out, start = [], 0
    for row in inputs.positions:
        for lay in row.layouts:
            out.append(lay.to_sequence(features[start:start + lay.n_crops]).flatten(0, 1))
            start += lay.n_crops
    return torch.cat(out)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_residuals_patterns_features(pair, case):
    hf, processor, model = pair
    images, prompt, grids = CASES[case]
    enc, inputs, out, cache = _run(hf, processor, model, images, prompt)
    row = inputs.positions[0]
    assert [row.tile_grid(i) for i in range(len(images))] == grids
    close(_sequence_order(cache["vision_projector.hook_out"], inputs), reference_image_features(out))
    # the image positions are exactly where the features go: every <image> token, nothing else
    assert torch.equal(row.image, (enc["input_ids"][0] == hf.config.image_token_id).nonzero().flatten())
    embed, feats, side = cache["hook_embed"][0], cache["vision_projector.hook_out"], row.layouts[0].side
    rows, cols = grids[0]
    for r in range(side):
        for c in range(side):
            close(embed[row.patch(r, c)], feats[0, r * side + c])  # crop 0: the global image
            # the last tile is crop rows * cols (crop 1 + tile index)
            close(embed[int(row.tile(rows - 1, cols - 1)[r, c])], feats[rows * cols, r * side + c])


def test_vision_hidden_states_of_every_crop(pair):
    hf, processor, model = pair
    images, prompt, _ = CASES["two images"]
    enc = processor(images=[images], text=[prompt], return_tensors="pt")
    inputs = model.to_inputs(images, prompt)
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision_encoder"))
    crops = enc["pixel_values"][0]  # [n_crops, C, S, S]: processor order, no padding crop (one row)
    ref = hf.model.vision_model(crops, output_hidden_states=True)
    n = model.cfg.vision.n_layers
    ours = [cache[f"vision_encoder.blocks.{l}.hook_resid_pre"] for l in range(n)]
    ours += [cache[f"vision_encoder.blocks.{n - 1}.hook_resid_post"], cache["vision_encoder.ln_post.hook_normalized"]]
    theirs = list(ref.hidden_states) + [ref.last_hidden_state]
    assert len(ours) == len(theirs) == n + 2
    for a, b in zip(ours, theirs):
        close(_sequence_order(a, inputs), b.flatten(0, 1))


def test_image_that_is_not_split(pair):
    """With ``do_image_splitting=False`` every image is one crop (the global image alone, resized to a square)."""
    hf, processor, _ = pair
    unsplit = copy.deepcopy(processor)
    unsplit.image_processor.do_image_splitting = False
    model = HookedVLM.from_hf(hf, unsplit, device="cpu", **NO_PROCESSING)
    images = [random_image(5, size=(40, 70))]
    enc, inputs, _, _ = _run(hf, unsplit, model, images, PROMPT)
    row = inputs.positions[0]
    assert row.tile_grid(0) == (0, 0) and inputs.pixel_values.shape[1] == 1 and len(row.image) == 4
    assert [model.to_str_tokens(inputs)[p] for p in row.named["global_marker"]] == ["<global-img>"]


def test_tile_grid_when_the_longest_edge_is_not_a_multiple_of_the_crop(pair):
    """With ``longest_edge=80`` (not a multiple of the 32 px crops) a 30x80 image stays 30x80, is enlarged to 96 px
    wide and so to 96 * 30 / 80 = 36 -> 64 px high: two rows of tiles, not the one its 30 px height alone gives."""
    hf, processor, _ = pair
    other = copy.deepcopy(processor)
    other.image_processor.size = {"longest_edge": 80}
    model = HookedVLM.from_hf(hf, other, device="cpu", **NO_PROCESSING)
    _, inputs, _, _ = _run(hf, other, model, [random_image(7, size=(30, 80))], PROMPT)
    assert inputs.positions[0].tile_grid(0) == (2, 3)


def test_labels_and_named_groups(pair):
    from mm_lens.analysis.groups import resolve

    hf, processor, model = pair
    images, prompt, _ = CASES["two images"]
    inputs = model.to_inputs(images, prompt)
    labels, row = model.to_str_tokens(inputs), inputs.positions[0]
    assert labels[row.patch(1, 0)] == "<img 1,0>" and labels[row.patch(0, 1, image=1)] == "<img 1:0,1>"
    assert labels[int(row.tile(2, 1)[0, 1])] == "<img t2,1 0,1>"
    assert labels[int(row.tile(0, 2, image=1)[1, 1])] == "<img 1:t0,2 1,1>"
    markers = {name: [labels[p] for p in resolve(model, inputs, name)] for name in
               ("image_marker", "tile_marker", "global_marker", "image_newline", "image_start", "image_end")}
    assert markers["tile_marker"] == [f"<row_{r}_col_{c}>" for r in (1, 2, 3) for c in (1, 2, 3)] + \
        [f"<row_1_col_{c}>" for c in (1, 2, 3)]
    assert markers["global_marker"] == ["<global-img>"] * 2
    assert set(markers["image_marker"]) == {"<fake_token_around_image>"} and len(markers["image_marker"]) == 9 + 3 + 4
    assert markers["image_newline"] == ["\n"] * (3 + 1 + 1 + 1)  # after each tile row, then before the global image
    assert markers["image_start"] == markers["image_end"] == ["<fake_token_around_image>"] * 2
    image = set(row.image.tolist())
    assert not any(set(resolve(model, inputs, name).tolist()) & image for name in markers)
    assert [labels[p] for p in row.span("which picture")] == ["which", "picture"]


def test_object_boxes_map_to_every_tile_and_the_global_image(pair):
    """A 64x96 image is resized to 64x96 (already at the longest edge) and cut into 2x3 tiles of 32 px (2x2 tokens
    of 16 px each); the global image is the whole image squeezed to 32x32 (tokens of 48x32 original px). The box
    (0, 0, 16, 16) covers token (0, 0) of tile (0, 0), and of the global image the token (0, 0)."""
    from mm_lens.analysis.groups import resolve

    hf, processor, model = pair
    inputs = model.to_inputs(random_image(6, size=(64, 96)), PROMPT)
    row = inputs.positions[0]
    assert row.tile_grid(0) == (2, 3)
    assert resolve(model, inputs, groups_object((0, 0, 16, 16))).tolist() == sorted(
        [row.patch(0, 0), int(row.tile(0, 0)[0, 0])])
    inside = resolve(model, inputs, groups_object((50, 40, 90, 60))).tolist()
    expected = [int(row.tile(1, 1)[0, 1]), int(row.tile(1, 1)[1, 1]), int(row.tile(1, 2)[0, 0]),
                int(row.tile(1, 2)[1, 0]), int(row.tile(1, 2)[0, 1]), int(row.tile(1, 2)[1, 1]), row.patch(1, 1)]
    assert inside == sorted(expected)
    non = resolve(model, inputs, groups_object((50, 40, 90, 60), inside=False)).tolist()
    assert sorted(non + inside) == row.image.tolist()


def groups_object(box, inside=True):
    from mm_lens.analysis import groups

    return groups.object_patches(box) if inside else groups.non_object_patches(box)


def test_mask_region_blanks_the_box_in_every_crop(pair):
    from mm_lens.analysis import corruptions

    hf, processor, model = pair
    inputs = model.to_inputs(random_image(6, size=(64, 96)), PROMPT)
    masked = corruptions.mask_region(model, inputs, (0, 0, 16, 16))
    changed = (masked.pixel_values != inputs.pixel_values).any(2)[0]  # [n_crops, S, S]
    assert bool(changed[0, :16, :16].all()) and not bool(changed[0, 16:].any())  # global image: token (0, 0)
    assert bool(changed[1, :16, :16].all()) and int(changed[2:].sum()) == 0  # tile (0, 0) only


def test_padded_batch(pair):
    hf, processor, model = pair
    images = [[random_image(1, size=(40, 70))], [random_image(2, size=(90, 30)), random_image(3, size=(50, 50))]]
    prompts = [PROMPT, TWO]
    inputs = assert_padded_batch_matches(hf, processor, model, images, prompts)
    assert inputs.pixel_values.shape[:2] == (3, 10)  # three images, at most 3x3 tiles + the global image
    span = inputs.positions[1].span("the red circle")
    assert [model.to_str_tokens(inputs)[1][p] for p in span.tolist()] == ["the", "red", "circle"]


def test_text_only(pair):
    hf, processor, model = pair
    text = "USER: what is the color of the circle ? ASSISTANT:"
    enc = processor(text=text, return_tensors="pt")
    inputs = model.to_inputs(None, text)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    close(model(inputs), hf(**enc).logits)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generation_equals_hugging_face_greedy(pair, use_past_kv_cache):
    hf, processor, model = pair
    images = [[random_image(1, size=(40, 70))], [random_image(2, size=(90, 30))]]
    assert_greedy_generation_matches(hf, processor, model, images, [PROMPT, OTHER], 6, use_past_kv_cache)


@pytest.mark.parametrize("n_side, rows", [(4, 4), (19, 19), (25, 25), (5, 25), (16, 12)])
def test_position_buckets_equal_hugging_face(n_side, rows):
    """Hugging Face's embedding (float32 fractional coordinates, bucketed) reads the table at the same rows as
    :func:`bucket_positions`, including sizes where float rounding moves patches down a bucket."""
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=4, image_size=n_side, patch_size=1))
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(n_side * n_side, dtype=torch.float32)[:, None].expand(-1, 4))
    mask = torch.ones(1, rows, rows + 1, dtype=torch.bool)
    ref = emb(torch.zeros(1, 3, rows, rows + 1), mask)[0, :, 0].long()
    assert torch.equal(bucket_positions(n_side, rows, rows + 1), ref)
    if n_side == rows == 19:
        assert not torch.equal(ref, torch.arange(19)[:, None] * 19 + torch.arange(20)[None] * 19 // 20)


@pytest.mark.parametrize("where", ["text_q", "vision_q", "connector"])
def test_parity_fails_on_a_wrong_transposition(pair, where):
    hf, processor, model = pair
    images, prompt, _ = CASES["wide"]
    broken = copy.deepcopy(model)
    if where == "connector":
        W = broken.vision_projector.W_in.data
        W.copy_(W.clone().reshape(W.shape[1], W.shape[0]).T)
    else:
        W = (broken.blocks[1] if where == "text_q" else broken.vision_encoder.blocks[0]).attn.W_Q.data
        transpose_heads_(W)
    expected = hf(**processor(images=[images], text=[prompt], return_tensors="pt")).logits
    assert (broken(broken.to_inputs(images, prompt)) - expected).abs().max() > 1e-4


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs(*CASES["two images"][:2])
    processed = copy.deepcopy(model).process_weights()
    close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1))


def test_from_pretrained_folder_with_tied_embeddings(tmp_path):
    """SmolVLM-256M/500M tie the unembedding to the embedding: the saved folder has no ``lm_head.weight``."""
    hf, processor = tiny_idefics3("smolvlm", seed=2, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    model = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    assert model.cfg.original_architecture == "SmolVLMForConditionalGeneration"
    images, prompt, _ = CASES["wide"]
    close(model(model.to_inputs(images, prompt)), hf(**processor(images=[images], text=[prompt],
                                                                   return_tensors="pt")).logits)


def test_conversion_is_strict(pair):
    from mm_lens.conversion import idefics3

    hf, processor, model = pair
    assert_conversion_strict(idefics3, model, dict(hf.state_dict()), "encoder.layers.1.self_attn.k_proj.bias",
                             "model.connector.modality_projection.extra.weight")


def test_bf16_within_the_bounds_of_the_other_families(pair):
    hf, processor, _ = pair
    images = [[random_image(1, size=(40, 70))], [random_image(2, size=(90, 30))]]
    assert_bf16_close_to_hugging_face(hf, processor, images, [PROMPT, OTHER])


def test_cache_estimate_equals_the_cache(pair):
    hf, processor, model = pair
    images = [[random_image(1, size=(40, 70))], [random_image(2, size=(90, 30))]]
    assert_cache_estimate_exact(model, model.to_inputs(images, [PROMPT, OTHER]))


def test_pixel_tensors_videos_and_counts_are_refused(pair):
    hf, processor, model = pair
    image = random_image(1, size=(40, 70))
    inputs = model.to_inputs(image, PROMPT)
    with pytest.raises(TypeError, match="PIL images"):
        model.to_inputs(inputs.pixel_values[0], PROMPT)
    with pytest.raises(ValueError, match="placeholder"):
        model.to_inputs([image, image], PROMPT)
    if getattr(processor, "video_token", None):
        with pytest.raises(ValueError, match="video"):
            model.to_inputs(None, "USER: <video> what is this ?")
