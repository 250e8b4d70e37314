"""Bunny-Phi layout (``BunnyPhiForCausalLM``: Phi-2 + SigLIP + mlp2x_gelu, checkpoint written by the test in
exactly the published key layout) against a reference composed of Hugging Face modules
(``PhiForCausalLM`` + ``SiglipVisionModel`` + ``nn.Sequential`` projector), float32, 1e-4."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mm_lens import HookedVLM
from mm_lens.testing import _spread_init, make_tokenizer, random_image
from tests.conftest import NO_PROCESSING
from tests.parity.compare import assert_residuals_match, close, transpose_heads_

ATOL = 1e-4
IMAGE_TOKEN_INDEX = -200  # Bunny's placeholder id
PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
VARIANTS = {
    # repository layout: the whole SigLIP tower (pooling head included), features = hidden_states[-2]
    "repo-layout": dict(drop_last_layer=False, lm_head_bias=False),
    # remote-code layout: last vision layer deleted and no head, features = hidden_states[-1]; lm_head with bias
    "remote-layout": dict(drop_last_layer=True, lm_head_bias=True),
}


class Reference(nn.Module):
    """Bunny's forward from Hugging Face parts: image features spliced in at the placeholder."""

    def __init__(self, tokenizer, d_model=48, d_vision=32, vision_layers=3):
        super().__init__()
        from transformers import PhiConfig, PhiForCausalLM, SiglipVisionConfig, SiglipVisionModel

        self.phi = PhiForCausalLM(PhiConfig(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, rope_theta=10000.0,
            max_position_embeddings=512, hidden_act="gelu_new", layer_norm_eps=1e-5))
        self.siglip = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
            num_attention_heads=4, image_size=28, patch_size=7))
        self.projector = nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.phi.set_attn_implementation("eager")
        self.siglip.set_attn_implementation("eager")

    def input_ids(self, tokenizer, prompt):
        """Bunny's tokenisation: chunks around ``<image>`` tokenised alone, joined by -200, one BOS."""
        chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids = ids + [IMAGE_TOKEN_INDEX] + chunk[1:]
        return torch.tensor([ids])

    def forward(self, input_ids, pixel_values):
        features = self.projector(self.siglip(pixel_values, output_hidden_states=True).hidden_states[-2])
        pos = int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero())
        text = self.phi.model.embed_tokens(input_ids.clamp(min=0))
        embeds = torch.cat([text[:, :pos], features, text[:, pos + 1:]], dim=1)
        return self.phi(inputs_embeds=embeds, output_hidden_states=True, output_attentions=True), features


def write_bunny_checkpoint(folder, tower_folder, ref, tokenizer, drop_last_layer, lm_head_bias):
    """Weights and config.json exactly as a Bunny-Phi release lays them out; a SigLIP folder beside it."""
    from transformers import SiglipImageProcessor

    state = {k: v for k, v in ref.phi.state_dict().items()}
    if not lm_head_bias:
        del state["lm_head.bias"]
    n_vision = ref.siglip.config.num_hidden_layers
    for k, v in ref.siglip.state_dict().items():
        k = k if k.startswith("vision_model.") else "vision_model." + k  # the published (4.x) key names
        if drop_last_layer and (k.startswith(f"vision_model.encoder.layers.{n_vision - 1}.")
                                or k.startswith("vision_model.head.")):
            continue
        state["model.vision_tower.vision_tower." + k] = v
    for k, v in ref.projector.state_dict().items():
        state["model.mm_projector." + k] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    pc = ref.phi.config
    config = dict(
        architectures=["BunnyPhiForCausalLM"], model_type="bunny-phi",
        auto_map={"AutoConfig": "configuration_bunny_phi.BunnyPhiConfig",
                  "AutoModelForCausalLM": "modeling_bunny_phi.BunnyPhiForCausalLM"},
        vocab_size=pc.vocab_size, hidden_size=pc.hidden_size, intermediate_size=pc.intermediate_size,
        num_hidden_layers=pc.num_hidden_layers, num_attention_heads=pc.num_attention_heads,
        num_key_value_heads=pc.num_key_value_heads, hidden_act="gelu_new", layer_norm_eps=1e-5,
        max_position_embeddings=512, partial_rotary_factor=0.5, rope_theta=10000.0, qk_layernorm=False,
        tie_word_embeddings=False, mm_hidden_size=ref.siglip.config.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_tower="google/siglip-so400m-patch14-384", image_aspect_ratio="pad", use_mm_proj=True,
        tokenizer_padding_side="right", torch_dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))
    ref.siglip.config.save_pretrained(str(tower_folder))
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(str(tower_folder))


def make_bunny(tmp_path_factory, name, drop_last_layer, lm_head_bias, seed=7):
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(padding_side="right")
    ref = Reference(tokenizer).eval()
    _spread_init(ref)
    if not lm_head_bias:
        ref.phi.lm_head.bias.zero_()
    folder = tmp_path_factory.mktemp(name)
    tower = tmp_path_factory.mktemp(name + "-siglip")
    write_bunny_checkpoint(folder, tower, ref, tokenizer, drop_last_layer, lm_head_bias)
    return ref, tokenizer, folder, tower


@pytest.fixture(scope="module", params=list(VARIANTS))
def bunny(request, tmp_path_factory):
    with torch.no_grad():
        ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, request.param, **VARIANTS[request.param])
        model = HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    return ref, tokenizer, model


def test_config(bunny):
    ref, tokenizer, model = bunny
    cfg = model.cfg
    assert cfg.parallel_attn_mlp and cfg.rotary_dim == 6 and cfg.normalization_type == "LN"
    assert cfg.vision.architecture == "siglip" and cfg.vision_feature_select_strategy == "full"
    assert cfg.n_image_tokens == 16


def test_logits_residuals_patterns(bunny):
    ref, tokenizer, model = bunny
    image = random_image(1, size=(28, 28))
    inputs = model.to_inputs(image, PROMPT)
    ref_ids = ref.input_ids(tokenizer, PROMPT)
    text = inputs.positions.text
    assert torch.equal(inputs.input_ids[0, text], ref_ids[0][ref_ids[0] != IMAGE_TOKEN_INDEX])
    out, features = ref(ref_ids, inputs.pixel_values)
    logits, cache = model.run_with_cache(inputs)
    assert logits.shape == out.logits.shape
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    n = model.cfg.n_layers
    assert_residuals_match(model, cache, out.hidden_states, out.attentions)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[n], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["vision_projector.hook_out"], features, atol=ATOL, rtol=0)


def test_vision_hidden_states_and_pixels(bunny):
    from transformers import SiglipImageProcessor

    ref, tokenizer, model = bunny
    image = random_image(3, size=(40, 40))
    pv = model.to_inputs(image, PROMPT).pixel_values
    torch.testing.assert_close(pv, SiglipImageProcessor(size={"height": 28, "width": 28})(
        images=image, return_tensors="pt")["pixel_values"], atol=1e-6, rtol=0)
    hidden = ref.siglip(pv, output_hidden_states=True).hidden_states
    L = model.cfg.vision.n_layers  # the checkpoint may drop the reference's last layer: compare what it has
    for a, b in zip(model.vision_encoder.hidden_states(pv, list(range(L + 1))), hidden):
        close(a, b)


def test_images_are_padded_to_a_square_first(bunny):
    from transformers import SiglipImageProcessor

    from mm_lens.conversion.bunny import pad_to_square

    ref, tokenizer, model = bunny
    image = random_image(5, size=(20, 44))
    square = pad_to_square(image)
    assert square.size == (44, 44) and square.getpixel((0, 0)) == (127, 127, 127)
    expected = SiglipImageProcessor(size={"height": 28, "width": 28})(images=square, return_tensors="pt")
    torch.testing.assert_close(model.to_inputs(image, PROMPT).pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)


def test_processed_weights_keep_log_probs(bunny):
    ref, tokenizer, model = bunny
    inputs = model.to_inputs(random_image(1, size=(28, 28)), PROMPT)
    processed = copy.deepcopy(model).process_weights()
    torch.testing.assert_close(processed(inputs).log_softmax(-1), model(inputs).log_softmax(-1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("where", ["text_q", "vision_q", "projector"])
def test_parity_fails_on_a_wrong_transposition(bunny, where):
    ref, tokenizer, model = bunny
    broken = copy.deepcopy(model)
    if where == "projector":
        W = broken.vision_projector.W_out.data
        W.copy_(W.clone().T)
    else:
        blocks = broken.blocks if where == "text_q" else broken.vision_encoder.blocks
        W = blocks[0].attn.W_Q.data
        transpose_heads_(W)
    inputs = model.to_inputs(random_image(1, size=(28, 28)), PROMPT)
    out, _ = ref(ref.input_ids(tokenizer, PROMPT), inputs.pixel_values)
    assert (broken(inputs) - out.logits).abs().max() > ATOL


def test_strict_unknown_and_missing_keys(tmp_path_factory):
    from safetensors.torch import load_file

    ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, "strict", drop_last_layer=True, lm_head_bias=False)
    state = load_file(str(folder / "model.safetensors"))
    state["model.extra_module.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.fc2.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    assert "model.extra_module.weight" in str(err.value)
    del state["model.extra_module.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    assert "layers.1.mlp.fc2.bias" in str(err.value)


def test_loading_never_consults_remote_code(tmp_path_factory, monkeypatch):
    """config.json names remote code (auto_map); nothing that could resolve it is called."""
    import transformers
    import transformers.dynamic_module_utils as dynamic

    ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, "no-code", drop_last_layer=True, lm_head_bias=False)

    def refuse(*args, **kwargs):
        raise AssertionError("remote-code machinery was consulted")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(dynamic, "resolve_trust_remote_code", refuse)
    model = HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    assert model.cfg.parallel_attn_mlp
