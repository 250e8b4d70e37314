"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``: any-resolution tiling, unpadding, image_newline)
against Hugging Face, float32, 1e-4; and the positions of tiles, base image and newlines."""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava_next
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import assert_residuals_match, transpose_heads_

ATOL = 1e-4
SIZES = [(40, 48), (30, 70), (70, 30)]  # (height, width): 2x2 tiles, 1x3 (rows unpadded), 2x1 (cols unpadded)
CONFIGS = {
    "llama-clip": dict(text="llama", vision="clip"),
    "phi-siglip": dict(text="phi", vision="siglip", n_kv_heads=4),
    "qwen3-siglip": dict(text="qwen3", vision="siglip", n_kv_heads=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf, processor = tiny_llava_next(seed=11, **CONFIGS[request.param])
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


@pytest.mark.parametrize("size", SIZES)
def test_logits_residuals_patterns(pair, size):
    hf, processor, model = pair
    image = random_image(1, size=size)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[-1], atol=ATOL, rtol=0)
    ref_features = hf.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).pooler_output
    torch.testing.assert_close(cache["anyres.hook_packed"], torch.cat(list(ref_features)), atol=ATOL, rtol=0)


def test_padded_batch_of_two_sizes(pair):
    hf, processor, model = pair
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[1])]
    prompts = [PROMPT, "USER: <image>\nwhere is the red square ? ASSISTANT:"]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out = hf(**enc, position_ids=model.position_ids(inputs.attention_mask), output_hidden_states=True)
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=ATOL, rtol=0)
    assert_residuals_match(model, cache, out.hidden_states, where=real)
    # spans of the prompt work on tiled rows too (character offsets survive the processor's expansion)
    labels = model.to_str_tokens(inputs)
    span = inputs.positions[1].span("the red square")
    assert [labels[1][p] for p in span.tolist()] == ["the", "red", "square"]


@pytest.mark.parametrize("size", SIZES)
def test_positions_know_base_tiles_and_newlines(pair, size):
    hf, processor, model = pair
    inputs = model.to_inputs(random_image(3, size=size), PROMPT)
    _, cache = model.run_with_cache(inputs)
    embed, crops = cache["hook_embed"][0], cache["anyres.hook_tiles"]
    row = inputs.positions[0]
    g = model.cfg.vision.grid_size
    # base image: crop 0, patch (r, c) at row.patch(r, c)
    assert row.base().shape == (g, g)
    torch.testing.assert_close(embed[row.base().flatten()], crops[0], atol=0, rtol=0)
    assert row.patch(1, 2) == int(row.base()[1, 2])
    # newlines: the learned vector, one after each row of the tile map
    newlines = row.newlines()
    assert len(newlines) == row.tile_map().shape[0]
    torch.testing.assert_close(embed[newlines], model.anyres.image_newline.expand(len(newlines), -1), atol=0, rtol=0)
    assert torch.equal(newlines, row.tile_map()[:, -1] + 1)
    # every kept tile patch carries the features of that tile's crop at the same in-tile cell
    th, tw = row.tile_grid()
    lay = row.layouts[0]
    for tr, tc in lay.tiles:
        crop = crops[1 + tr * tw + tc].view(g, g, -1)
        grid = row.tile(tr, tc)
        full = row.tile_map()
        r0 = int((full == grid[0, 0]).nonzero()[0, 0])
        c0 = int((full == grid[0, 0]).nonzero()[0, 1])
        r_in, c_in = (tr * g) - _pad(lay, "rows", g), (tc * g) - _pad(lay, "cols", g)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                src = crop[r0 + i - r_in, c0 + j - c_in]
                torch.testing.assert_close(embed[int(grid[i, j])], src, atol=0, rtol=0)
    labels = model.to_str_tokens(inputs)
    assert labels[int(row.base()[1, 2])] == "<img 1,2>" and labels[int(newlines[0])] == "<img nl>"
    tr, tc = sorted(lay.tiles)[-1]
    assert labels[int(row.tile(tr, tc)[0, 0])] == f"<img t{tr},{tc} 0,0>"
    # unpadding dropped map rows (wide image) or columns (tall image)
    rows, cols = row.tile_map().shape
    h, w = size
    assert (rows < th * g) == (w / h > tw / th) or rows == th * g
    assert rows * (cols + 1) + g * g == len(row.image)


def _pad(lay, axis, g):
    """Rows (or columns) cut from the top (left) of the stitched map by unpadding."""
    th, tw = lay.tile_grid
    full = th * g if axis == "rows" else tw * g
    kept = lay.map_positions.shape[0 if axis == "rows" else 1]
    return (full - kept) // 2


def test_parity_fails_on_a_wrong_transposition(pair):
    hf, processor, model = pair
    broken = copy.deepcopy(model)
    W = broken.vision_encoder.blocks[0].attn.W_Q.data
    transpose_heads_(W)
    image = random_image(1, size=SIZES[1])
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


def test_processed_weights_keep_log_probs(pair):
    hf, processor, model = pair
    inputs = model.to_inputs(random_image(1, size=SIZES[0]), PROMPT)
    processed = copy.deepcopy(model).process_weights()
    torch.testing.assert_close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1), atol=ATOL, rtol=0)


def test_from_pretrained_folder(pair, tmp_path):
    hf, processor, model = pair
    hf.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    inputs = loaded.to_inputs(random_image(2, size=SIZES[2]), PROMPT)
    torch.testing.assert_close(loaded(inputs), model(inputs), atol=ATOL, rtol=0)
    assert loaded.cfg.original_architecture == "LlavaNextForConditionalGeneration"
