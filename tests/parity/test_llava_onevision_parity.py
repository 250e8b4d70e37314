"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) against Hugging Face, float32, 1e-4: tiling with
unpadding and ``anyres_max_N`` reduction (``max_tiles=2``: shrunk maps; 9: none), the multi-image mode (several
images in one prompt: no tiling, one newline each), non-square images, a padded batch mixing both modes; inputs
equal the processor's; positions know the base grid, tiles, newlines; a Qwen3 language model (q/k norms) with weight
processing off and at its defaults; a transposed weight fails."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava_onevision
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import (
    assert_greedy_generation_matches,
    assert_residuals_match,
    assert_vision_states_match,
    close,
    transpose_heads_,
)

ATOL = 1e-4
SIZES = [(40, 48), (30, 70), (70, 30), (20, 24)]  # (height, width): 2x2, 1x3 and 3x3 tiles, one tile
TWO = "USER: <image> <image>\nwhich picture is the red circle in ? ASSISTANT:"


@pytest.fixture(scope="module", params=[2, 9], ids=["anyres_max_2", "anyres_max_9"])
def pair(request):
    hf, processor = tiny_llava_onevision(seed=13, anyres_max=request.param)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def _check(hf, processor, model, images, prompts):
    """Both models on the processor's input (several images of one prompt grouped, as its multi-image mode reads
    them): input ids, logits, every residual stream and pattern, the packed image features."""
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, position_ids=model.position_ids(inputs.attention_mask), output_hidden_states=True,
             output_attentions=not inputs.padded)
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    close(logits[real], out.logits[real])
    assert_residuals_match(model, cache, out.hidden_states, None if inputs.padded else out.attentions, where=real)
    ref = hf.model.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"],
                                      batch_num_images=enc["batch_num_images"]).pooler_output
    close(cache["anyres.hook_packed"], torch.cat(list(ref)))
    return inputs


@pytest.mark.parametrize("size", SIZES)
def test_one_image(pair, size):
    hf, processor, model = pair
    inputs = _check(hf, processor, model, [random_image(1, size=size)], [PROMPT])
    lay = inputs.positions[0].layouts[0]
    if model.anyres.max_tiles == 2 and size != (20, 24):
        assert lay.reduced is not None  # the map is shrunk
    if model.anyres.max_tiles == 9:
        assert lay.reduced is None


def test_two_images_in_one_prompt(pair):
    """OneVision's multi-image mode: each image is its base grid and one newline (no tiles)."""
    hf, processor, model = pair
    images = [random_image(1, size=(40, 48)), random_image(2, size=(60, 30))]
    inputs = _check(hf, processor, model, [images], [TWO])
    row, g = inputs.positions[0], model.cfg.vision.grid_size
    assert [len(p) for p in row.images] == [g * g + 1] * 2
    assert row.layouts[0].tile_grid == (0, 0) and not row.layouts[0].alone
    labels = model.to_str_tokens(inputs)
    assert labels[int(row.images[1][-1])] == "<img 1:nl>" and labels[row.patch(0, 1, image=1)] == "<img 1:0,1>"
    assert torch.equal(row.named["image_newline"], torch.stack([row.images[0][-1], row.images[1][-1]]))


def test_padded_batch_mixing_both_modes(pair):
    hf, processor, model = pair
    images = [[random_image(1, size=SIZES[1])], [random_image(2), random_image(3, size=(50, 36))]]
    prompts = [PROMPT, "USER: <image> <image>\nwhere is the red square ? answer in a few words . ASSISTANT:"]
    inputs = _check(hf, processor, model, images, prompts)
    assert inputs.padded
    span = inputs.positions[1].span("the red square")
    assert [model.to_str_tokens(inputs)[1][p] for p in span.tolist()] == ["the", "red", "square"]


@pytest.mark.parametrize("size", SIZES[:3])
def test_positions_know_base_tiles_and_newlines(pair, size):
    hf, processor, model = pair
    inputs = model.to_inputs(random_image(3, size=size), PROMPT)
    _, cache = model.run_with_cache(inputs)
    embed, crops = cache["hook_embed"][0], cache["anyres.hook_tiles"]
    row, lay = inputs.positions[0], inputs.positions[0].layouts[0]
    g = model.cfg.vision.grid_size
    close(embed[row.base().flatten()], crops[0])  # the base image: crop 0, patch (r, c) at row.patch(r, c)
    newlines = row.newlines()
    assert len(newlines) == row.tile_map().shape[0] and torch.equal(newlines, row.tile_map()[:, -1] + 1)
    close(embed[newlines], model.anyres.image_newline.expand(len(newlines), -1))
    assert torch.equal(row.named["image_newline"], newlines)
    # every kept cell sits in the tile its (nearest) source cell comes from, tiles in row-major order of the map
    th, tw = lay.tile_grid
    for (tr, tc), grid in lay.tiles.items():
        full = lay.map_positions
        rows = [int((full == grid[i, 0]).nonzero()[0, 0]) for i in range(grid.shape[0])]
        assert rows == sorted(rows) and grid.numel() > 0 and 0 <= tr < th and 0 <= tc < tw
    if lay.reduced is None:  # unreduced: a kept tile cell carries its crop's feature at the same in-tile cell
        tr, tc = sorted(lay.tiles)[-1]
        src = crops[1 + tr * tw + tc].view(g, g, -1)
        cell = row.tile(tr, tc)
        assert any(torch.allclose(embed[int(cell[-1, -1])], src[i, j]) for i in range(g) for j in range(g))
    labels = model.to_str_tokens(inputs)
    assert labels[int(row.base()[1, 2])] == "<img 1,2>" and labels[int(newlines[0])] == "<img nl>"
    tr, tc = sorted(lay.tiles)[-1]
    assert labels[int(row.tile(tr, tc)[0, 0])] == f"<img t{tr},{tc} 0,0>"
    assert g * g + lay.map_positions.numel() + len(newlines) == len(row.image)


def test_vision_hidden_states(pair):
    hf, processor, model = pair
    pv = model.to_inputs(random_image(4, size=SIZES[0]), PROMPT).pixel_values[0]
    ref = hf.model.vision_tower(pv, output_hidden_states=True)
    assert_vision_states_match(model, pv, ref.hidden_states)


@pytest.mark.parametrize("processing", ["off", "default"])
def test_qwen3_text_tower(processing):
    """A Qwen3 language model (q/k norms, head_dim of its own): one tiled image and two images in multi-image mode."""
    hf, processor = tiny_llava_onevision(text="qwen3", seed=14, anyres_max=2)
    hf.set_attn_implementation("eager")
    model = HookedVLM.from_hf(hf, processor, device="cpu", **(NO_PROCESSING if processing == "off" else {}))
    assert model.cfg.use_qk_norm
    if processing == "off":
        _check(hf, processor, model, [random_image(1, size=SIZES[0])], [PROMPT])
        _check(hf, processor, model, [[random_image(1), random_image(2)]], [TWO])
        return
    images = [random_image(1, size=SIZES[0])]  # the centred unembedding moves logits, not log-probs
    enc = processor(images=images, text=[PROMPT], return_tensors="pt")
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(model.to_inputs(images, PROMPT))
    close(logits.log_softmax(-1), out.logits.log_softmax(-1))
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)


def test_parity_fails_on_a_wrong_transposition(pair):
    hf, processor, model = pair
    broken = copy.deepcopy(model)
    W = broken.blocks[1].attn.W_Q.data
    transpose_heads_(W)
    image = random_image(1, size=SIZES[1])
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs([[random_image(1), random_image(2)]], [TWO])
    processed = copy.deepcopy(model).process_weights()
    close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1))


def test_from_pretrained_folder(pair, tmp_path):
    hf, processor, model = pair
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    assert loaded.cfg.original_architecture == "LlavaOnevisionForConditionalGeneration"
    assert loaded.anyres.max_tiles == model.anyres.max_tiles and loaded.anyres.multi_image
    inputs = loaded.to_inputs(random_image(2, size=SIZES[2]), PROMPT)
    close(loaded(inputs), model(inputs))


def test_videos_are_refused(pair):
    hf, processor, model = pair
    with pytest.raises(ValueError, match="videos are not supported"):
        model.to_inputs(None, "USER: <video>\nwhat happens ? ASSISTANT:")


def test_unsupported_aspect_ratio_is_refused(pair):
    from mm_lens.conversion import llava_onevision

    hf, processor, model = pair
    cfg = copy.deepcopy(hf.config)
    cfg.vision_aspect_ratio = "pad"
    with pytest.raises(ValueError, match="anyres_max_N"):
        llava_onevision.translate_config(cfg)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generation_equals_hugging_face_greedy(pair, use_past_kv_cache):
    """A padded batch mixing a tiled image and two images in multi-image mode."""
    hf, processor, model = pair
    images = [[random_image(1, size=SIZES[0])], [random_image(2), random_image(3, size=(50, 36))]]
    assert_greedy_generation_matches(hf, processor, model, images, [PROMPT, TWO], 8, use_past_kv_cache)
