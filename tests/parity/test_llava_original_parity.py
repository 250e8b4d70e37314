"""Original LLaVA repository layout (``LlavaLlamaForCausalLM`` / ``LlavaPhiForCausalLM``: text model under
``model.``, ``model.mm_projector.{0,2}``, CLIP tower in a separate checkpoint), written by the test from a
Hugging Face LLaVA, which is the reference forward. Float32, 1e-4."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import assert_image_features_match, assert_residuals_match, transpose_heads_

ATOL = 1e-4
ARCH = {"llama": "LlavaLlamaForCausalLM", "phi": "LlavaPhiForCausalLM"}


def write_original_layout(hf, processor, folder, tower):
    """Weights and config.json as the LLaVA repository saves them; the CLIP tower in its own folder."""
    state = {"model." + k: v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.mm_projector.{i}.{p}"] = getattr(hf.model.multi_modal_projector, name).__getattr__(p)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    text = hf.config.text_config.to_dict()
    config = {**{k: v for k, v in text.items() if k not in ("architectures", "model_type")},
              "architectures": [ARCH[hf.config.text_config.model_type]], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_hidden_size": hf.config.vision_config.hidden_size,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": hf.config.vision_feature_layer,
              "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "image_aspect_ratio": "pad", "tokenizer_padding_side": "right"}
    (folder / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(str(folder))
    hf.model.vision_tower.save_pretrained(str(tower))
    processor.image_processor.save_pretrained(str(tower))


def write_llava_phi_layout(hf, processor, folder, lm_head_bias):
    """The llava-phi repository's layout: CLIP config nested in config.json, tower weights under
    ``model.vision_tower.vision_model.``, ``lm_head`` with a bias."""
    state = {"model." + k: v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"], state["lm_head.bias"] = hf.lm_head.weight, lm_head_bias
    for k, v in hf.model.vision_tower.state_dict().items():
        state["model.vision_tower.vision_model." + k] = v
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.mm_projector.{i}.{p}"] = getattr(hf.model.multi_modal_projector, name).__getattr__(p)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    text = {k: v for k, v in hf.config.text_config.to_dict().items() if k not in ("architectures", "model_type")}
    vision = {**hf.config.vision_config.to_dict(), "mm_vision_select_feature": "patch",
              "mm_vision_select_layer": hf.config.vision_feature_layer}
    config = {**text, "architectures": ["LlavaPhiForCausalLM"], "model_type": "llava_phi",
              "vision_config": {"vision_tower": vision, "mm_projector": {
                  "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision["hidden_size"],
                  "hidden_size": text["hidden_size"]}}}
    (folder / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(str(folder))


@pytest.fixture(scope="module", params=["llama", "phi", "llava-phi"])
def pair(request, tmp_path_factory):
    with torch.no_grad():
        text = "phi" if "phi" in request.param else "llama"
        hf, processor = tiny_llava_towers(text, "clip", seed=13, n_kv_heads=4 if text == "phi" else 2)
        hf.set_attn_implementation("eager")
        folder, tower = tmp_path_factory.mktemp("llava"), tmp_path_factory.mktemp("clip")
        if request.param == "llava-phi":  # the reference is HF LLaVA plus the head bias
            bias = 0.5 * torch.randn(hf.lm_head.weight.shape[0])
            write_llava_phi_layout(hf, processor, folder, bias)
            hf.lm_head.bias = torch.nn.Parameter(bias)
            model = HookedVLM.from_pretrained(str(folder), device="cpu", **NO_PROCESSING)
            tower = None
        else:
            write_original_layout(hf, processor, folder, tower)
            model = HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    return hf, processor, model, folder, tower


def _as_the_checkpoint_sees_it(folder, processor, image):
    """LLaVA-1.5 pads images to a square of the mean colour when its config says image_aspect_ratio: pad."""
    from mm_lens.conversion.bunny import pad_to_square

    if json.loads((folder / "config.json").read_text()).get("image_aspect_ratio") == "pad":
        return pad_to_square(image, processor.image_processor.image_mean)
    return image


def test_logits_residuals_patterns(pair):
    hf, processor, model, folder, _ = pair
    image = random_image(1)
    enc = processor(images=_as_the_checkpoint_sees_it(folder, processor, image), text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    torch.testing.assert_close(inputs.pixel_values, enc["pixel_values"], atol=1e-6, rtol=0)
    out = hf(**enc, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(inputs)
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    assert_image_features_match(cache, out)


def test_parity_fails_on_a_wrong_transposition(pair):
    hf, processor, model, folder, _ = pair
    broken = copy.deepcopy(model)
    W = broken.blocks[1].attn.W_O.data
    transpose_heads_(W)
    image = random_image(1)
    enc = processor(images=_as_the_checkpoint_sees_it(folder, processor, image), text=PROMPT, return_tensors="pt")
    assert (broken(broken.to_inputs(image, PROMPT)) - hf(**enc).logits).abs().max() > ATOL


def _with_extra_key(source, dest):
    """A copy of checkpoint folder ``source`` whose safetensors carry one key no table knows."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(source, dest)
    state = load_file(str(dest / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(dest / "model.safetensors"))
    return dest


def test_missing_tower_and_unknown_keys_are_errors(pair, tmp_path):
    hf, processor, model, folder, tower = pair
    if tower is None:  # LLaVA-Phi keeps its tower inside the checkpoint: an unknown key there is the error
        bad = _with_extra_key(folder, tmp_path / "checkpoint")
        with pytest.raises(ValueError, match="extra.weight"):
            HookedVLM.from_pretrained(str(bad), device="cpu", **NO_PROCESSING)
        return
    with pytest.raises(ValueError, match="vision_tower"):
        HookedVLM.from_pretrained(str(folder), device="cpu", **NO_PROCESSING)
    bad = _with_extra_key(tower, tmp_path / "tower")
    with pytest.raises(ValueError, match="extra.weight"):
        HookedVLM.from_pretrained(str(folder), vision_tower=str(bad), device="cpu", **NO_PROCESSING)
