"""Bad input gets a clear error that says what was wrong and how to fix it."""

import numpy as np
import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.conversion import convert_hf_model
from mm_lens.conversion.common import load_strict
from mm_lens.conversion.llava import conversion_rules
from mm_lens.inputs import load_image
from tests.conftest import PROMPT


def test_more_placeholders_than_images(llava_pair, image):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\).*but 1 image\(s\)"):
        model.to_inputs([image], "USER: <image> <image>\nwhat ? ASSISTANT:")


def test_more_images_than_placeholders(llava_pair, image, image2):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*but 2 image\(s\)"):
        model.to_inputs([image, image2], PROMPT)


def test_placeholders_without_images(llava_pair):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*but 0 image\(s\)"):
        model.to_inputs(None, PROMPT)


def test_token_ids_with_placeholders_but_no_pixels(llava_pair, image):
    _, _, model = llava_pair
    ids = model.to_inputs(image, PROMPT).input_ids
    with pytest.raises(ValueError, match="no pixel values|image placeholders but no pixel"):
        model(ids)


def test_images_but_no_image_positions(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    from dataclasses import replace

    text_only = model.to_inputs(None, "what is the color ?")
    broken = replace(text_only, pixel_values=inputs.pixel_values)
    with pytest.raises(ValueError, match="no image positions"):
        model(broken)


def test_wrong_pixel_tensor_size(llava_pair):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"must have shape \[n, 3, 32, 32\].*resize"):
        model.to_inputs(torch.zeros(3, 64, 64), PROMPT)
    with pytest.raises(ValueError, match=r"pixel_values must have shape"):
        model.image_features(torch.zeros(1, 3, 16, 16))


def test_wrong_image_type_and_missing_file(llava_pair):
    _, _, model = llava_pair
    with pytest.raises(TypeError, match="PIL images, file paths"):
        model.to_inputs(object(), PROMPT)
    with pytest.raises(ValueError, match="does not exist"):
        model.to_inputs("/nonexistent/cat.png", PROMPT)


def test_bad_return_type_and_single_token(llava_pair, image):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match="return_type must be one of"):
        model(model.to_inputs(image, PROMPT), return_type="probs")
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token("red blue")


def test_batch_positions_need_a_row(llava_pair, image, image2):
    _, _, model = llava_pair
    inputs = model.to_inputs([image, image2], [PROMPT, PROMPT])
    with pytest.raises(ValueError, match=r"index one first, e.g. positions\[0\].image"):
        _ = inputs.positions.image
    assert len(inputs.positions[1].image) == model.cfg.n_image_tokens


def test_span_not_in_prompt(llava_pair, image):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match="is not in the prompt"):
        model.to_inputs(image, PROMPT).positions.span("giraffe")


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig, BertModel

    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture.*supported: \[.*'LlavaForConditionalGeneration'"):
        convert_hf_model(HookedVLM, hf)


def test_strict_conversion_names_missing_and_unexpected_keys(llava_pair):
    hf, processor, model = llava_pair
    source = dict(hf.state_dict())
    source["model.language_model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    del source["model.language_model.layers.1.mlp.up_proj.weight"]
    rules, ignore = conversion_rules(model.cfg, source)
    fresh = HookedVLM(model.cfg)
    with pytest.raises(ValueError) as err:
        load_strict(fresh, source, rules, ignore, family="LlavaForConditionalGeneration")
    msg = str(err.value)
    assert "missing source key 'model.language_model.layers.1.mlp.up_proj.weight'" in msg
    assert "unexpected source keys" in msg and "layers.0.self_attn.extra.weight" in msg


def test_strict_conversion_names_shape_mismatch(llava_pair):
    hf, processor, model = llava_pair
    source = dict(hf.state_dict())
    source["model.multi_modal_projector.linear_2.weight"] = torch.zeros(7, 7)
    rules, ignore = conversion_rules(model.cfg, source)
    with pytest.raises(ValueError, match=r"shape mismatch for vision_projector.W_out"):
        load_strict(HookedVLM(model.cfg), source, rules, ignore, family="LlavaForConditionalGeneration")


# ---------------------------------------------------------------- images in every form, and what is not one
@pytest.mark.parametrize("array, expected", [
    (np.full((6, 5, 3), 0.5), 128),                        # float in [0, 1]: scaled, not black
    (np.full((6, 5, 3), 40000, dtype=np.uint16), 156),     # uint16: scaled from 0..65535, not wrapped
    (np.full((6, 5), 200, dtype=np.int64), 200),           # integers holding 0..255 (HxW: grey)
    (np.full((6, 5, 1), True), 255),                       # bool: white
])
def test_arrays_convert_by_their_range(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (5, 6) and np.asarray(image)[0, 0].tolist() == [expected] * 3


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    image = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))
    image.save(tmp_path / "deep.png")
    for source in (image, tmp_path / "deep.png", str(tmp_path / "deep.png")):
        assert np.asarray(load_image(source))[0, 0].tolist() == [117] * 3  # 30000 / 65535 * 255, not white


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 4, 3), 3.0), r"float image must have values in \[0, 1\]"),
    (np.full((4, 4, 3), -1, dtype=np.int32), "values in 0..255"),
    (np.zeros((0, 0, 3), dtype=np.uint8), "no pixels"),
    (np.zeros((4, 4, 2), dtype=np.uint8), "HxW or HxWxC"),
])
def test_arrays_that_are_not_images(bad, message):
    with pytest.raises(ValueError, match=message):
        load_image(bad)


def test_empty_and_unreadable_images(llava_pair, tmp_path):
    from PIL import Image

    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"no pixels \(size 0x0\)"):
        model.to_inputs(Image.new("RGB", (0, 0)), PROMPT)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        model.to_inputs(str(tmp_path / "notes.png"), PROMPT)


# ---------------------------------------------------------------- tokens, context, hook names
def test_words_outside_the_vocabulary(llava_pair):
    _, _, model = llava_pair
    with pytest.raises(ValueError, match=r"'Red' \(closest tokens: 'red'"):
        model.to_single_token("Red")
    assert model.to_single_token("red") == model.tokenizer.convert_tokens_to_ids("red")
    with pytest.warns(UserWarning, match=r"'colour' \(closest tokens: 'color'"):
        model.to_inputs(None, "what colour is it ?")


def test_prompt_longer_than_the_context_window(llava_pair, image):
    _, _, model = llava_pair
    n_ctx = model.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"has {n_ctx + 1} positions .* context window \(cfg.n_ctx\) is {n_ctx}"):
        model.to_inputs(None, " ".join(["red"] * n_ctx))
    assert model.to_inputs(None, " ".join(["red"] * (n_ctx - 1))).shape[1] == n_ctx


def test_names_filter_that_names_no_hook(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    with pytest.raises(ValueError, match=r"'blocks.0.hook_resid_prex': nearest \['blocks.0.hook_resid_pre'"):
        model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_prex")
    with pytest.raises(ValueError, match="blocks.99.attn.hook_pattern"):
        model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_pre", "blocks.99.attn.hook_pattern"])
    _, cache = model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_pre"])
    assert list(cache.keys()) == ["blocks.0.hook_resid_pre"]
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.endswith("hook_embed"))
    assert len(cache) >= 1


def test_inputs_repr_is_a_summary(llava_pair, image):
    _, _, model = llava_pair
    inputs = model.to_inputs(image, PROMPT)
    inputs.meta["question"] = "what"
    text = repr(inputs)
    assert len(text) < 200 and "tensor" not in text
    assert text.startswith(f"MultimodalInput(batch 1, {inputs.shape[1]} positions") and "meta keys ['question']" in text
