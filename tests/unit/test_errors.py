"""Bad input gets a clear error that says what was wrong and how to fix it."""

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.conversion import convert_hf_model
from mm_lens.conversion.common import load_strict
from mm_lens.conversion.llava import conversion_rules
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
    with pytest.raises(ValueError, match=r"unsupported architecture.*supported: \['LlavaForConditionalGeneration'"):
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
