"""Qwen3-VL's DeepStack against Hugging Face, float32, 1e-4 (everything Qwen-VL shares, Qwen3-VL included, is in
:mod:`tests.parity.test_qwen_vl_parity`): ``hook_resid_pre`` against the input of each Hugging Face decoder layer
(which includes the DeepStack addition), ``hook_resid_post`` against ``hidden_states[l + 1]`` (which does not),
the merged and DeepStack features and ``hook_visual_in``, for one image of three shapes and two images in one
prompt; zero-ablating ``hook_visual_in`` equals Hugging Face with its DeepStack features zeroed; the residual
decompositions stay exact; the fast patching engine resumes with the DeepStack features; edge-level circuits find
DeepStack edges; image features of the wrong width, a transposed DeepStack weight, contiguous M-RoPE and a missing
DeepStack weight are caught."""

import copy
import warnings

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.analysis.fast_patch import capture, run_patched, set_positions
from mm_lens.testing import random_image
from mm_lens.testing_qwen import PROMPT, tiny_qwen_vl
from tests.conftest import NO_PROCESSING
from tests.parity.compare import assert_conversion_strict, close
from tests.parity.test_qwen_vl_parity import SIZES, TWO, hugging_face


@pytest.fixture(scope="module")
def pair():
    hf, processor = tiny_qwen_vl("3", seed=11)
    hf.set_attn_implementation("eager")
    return hf, processor, HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def check_deepstack(model, hf, processor, images, prompts):
    """Logits and what each decoder layer receives (:mod:`tests.parity.test_qwen_vl_parity` checks the rest for
    every Qwen-VL), ``hook_resid_post`` against ``hidden_states[l + 1]`` (before the DeepStack addition), the merged
    and DeepStack features image by image, and ``hook_visual_in``: the DeepStack features at the image positions,
    zero elsewhere."""
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    assert torch.equal(inputs.input_ids, enc["input_ids"])
    out, received = hugging_face(hf, enc)
    logits, cache = model.run_with_cache(inputs)
    close(logits, out.logits)
    n = model.cfg.n_layers
    for l in range(n):
        close(cache[f"blocks.{l}.hook_resid_pre"], received[l])
        if l < n - 1:  # Hugging Face's last hidden state is after the final norm
            close(cache[f"blocks.{l}.hook_resid_post"], out.hidden_states[l + 1])
    is_image = inputs.input_ids == model.cfg.image_token_id
    counts = [len(p) for p in out.image_outputs.pooler_output]
    per_image = lambda t: torch.cat([t[i, :k] for i, k in enumerate(counts)])  # noqa: E731
    close(per_image(cache["vision_projector.hook_out"]), torch.cat(out.image_outputs.pooler_output))
    deep = out.image_outputs.deepstack_features
    assert len(deep) == model.n_deepstack == 2
    for j, ref in enumerate(deep):
        close(per_image(cache[f"deepstack_mergers.{j}.hook_out"]), torch.cat(ref))
        visual = cache[f"blocks.{j}.hook_visual_in"]
        close(visual[is_image], torch.cat(ref))
        assert not bool(visual[~is_image].any())
    assert (cache["blocks.1.hook_resid_post"] - cache["blocks.2.hook_resid_pre"]).abs().max() > 1e-3


@pytest.mark.parametrize("size", SIZES)
def test_one_image_deepstack(pair, size):
    hf, processor, model = pair
    check_deepstack(model, hf, processor, random_image(1, size=size), PROMPT)


def test_two_images_in_one_prompt_deepstack(pair):
    hf, processor, model = pair
    check_deepstack(model, hf, processor, [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[2])], TWO)


def deepstack_zeroed(hf):
    """Hugging Face with every DeepStack merger's output replaced by zeros (an independent ablation)."""
    handles = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
               for m in hf.model.visual.deepstack_merger_list]
    return handles


def test_zero_ablating_visual_in_equals_hugging_face_without_deepstack(pair):
    hf, processor, model = pair
    image = random_image(1, size=SIZES[2])
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    ablated = model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{l}.hook_visual_in", zero)
                                                      for l in range(model.n_deepstack)])
    handles = deepstack_zeroed(hf)
    try:
        expected = hf(**enc).logits
    finally:
        for h in handles:
            h.remove()
    close(ablated, expected)
    assert (ablated - model(inputs)).abs().max() > 1e-3


def test_residual_decomposition_is_exact(pair):
    """``embed + sum(attn_out + mlp_out + visual_in)`` of the blocks before ``l`` is ``resid_pre`` of block ``l``, and
    ``cache.decompose_resid`` / ``get_full_resid_decomposition`` include the DeepStack additions (their sums are the
    residual stream)."""
    _, _, model = pair
    inputs = model.to_inputs(random_image(1, size=SIZES[2]), PROMPT)
    _, cache = model.run_with_cache(inputs)
    total = cache["hook_embed"]
    for l in range(model.cfg.n_layers):
        close(cache[f"blocks.{l}.hook_resid_pre"], total)
        total = total + cache[f"blocks.{l}.hook_attn_out"] + cache[f"blocks.{l}.hook_mlp_out"]
        if l < model.n_deepstack:
            total = total + cache[f"blocks.{l}.hook_visual_in"]
    close(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], total)
    for layer in (1, 2, None):
        parts, labels = cache.decompose_resid(layer, return_labels=True)
        top = model.cfg.n_layers if layer is None else layer
        assert [x for x in labels if x.endswith("visual_in")] == [f"{l}_visual_in" for l in range(min(top, 2))]
        expected = cache[f"blocks.{top}.hook_resid_pre"] if top < model.cfg.n_layers else total
        close(parts.sum(0), expected)
        full, full_labels = cache.get_full_resid_decomposition(layer, expand_neurons=False, return_labels=True)
        assert full_labels[-min(top, 2):] == [f"{l}_visual_in" for l in range(min(top, 2))]
        close(full.sum(0), expected)


def test_fast_patching_resumes_with_the_deepstack_features(pair):
    """Patching the residual stream into a block before, at and after the DeepStack layers on the fast engine
    equals a full forward with the same hook."""
    _, _, model = pair
    clean = model.to_inputs(random_image(1, size=SIZES[2]), PROMPT)
    corrupted = model.to_inputs(random_image(2, size=SIZES[2]), PROMPT)
    _, clean_cache = model.run_with_cache(clean)
    base, _ = capture(model, corrupted)
    assert base.visual is not None and len(base.visual) == 2
    image = clean.positions[0].image
    for layer in range(model.cfg.n_layers):
        for start in (0, int(image[3]), int(image[-1]) + 1):
            name = f"blocks.{layer}.hook_resid_pre"
            mask = torch.zeros(clean.input_ids.shape, dtype=torch.bool)
            mask[0, start] = True
            hook = set_positions(clean_cache[name], mask)
            fast = run_patched(model, base, layer, start, [(name, hook)], logits="all")
            full = model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])
            close(fast, full)


def test_image_features_of_the_wrong_width_are_refused(pair):
    _, _, model = pair
    inputs = model.to_inputs(random_image(1, size=SIZES[0]), PROMPT)
    features = model.image_features(inputs.pixel_values, inputs.image_sizes)
    assert features.shape == (6, 3 * model.cfg.d_model)  # projector, then the two DeepStack mergers
    close(model(inputs, image_features=features), model(inputs))
    with pytest.raises(ValueError, match="DeepStack"):
        model(inputs, image_features=features[:, :model.cfg.d_model])


def test_parity_fails_on_a_transposed_weight_or_contiguous_mrope(pair):
    hf, processor, model = pair
    image = random_image(1, size=SIZES[2])
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs = model.to_inputs(image, PROMPT)
    expected = hf(**enc).logits
    close(model(inputs), expected)
    broken = copy.deepcopy(model)
    W = broken.deepstack_mergers[1].W_in.data
    W.copy_(W.clone().T)
    assert (broken(inputs) - expected).abs().max() > 1e-4
    contiguous = copy.deepcopy(model)
    contiguous.rotary.mrope_interleaved = False
    assert (contiguous(inputs) - expected).abs().max() > 1e-4


def test_conversion_refuses_a_missing_deepstack_merger_weight(pair):
    from mm_lens.conversion import qwen3_vl

    hf, _, model = pair
    assert_conversion_strict(qwen3_vl, model, dict(hf.state_dict()), "deepstack_merger_list.1.linear_fc2.bias",
                             "model.visual.deepstack_merger_list.2.norm.weight")


def test_interleaved_mrope_equals_hugging_face_at_full_size():
    """Qwen3-VL-8B's text rotary (128-dim heads, sections 24, 20, 20, base 5e6) on random 3-axis positions against
    Hugging Face's ``Qwen3VLTextRotaryEmbedding``; the contiguous layout (Qwen2-VL's) differs."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from mm_lens.components import Rotary

    section = [24, 20, 20]
    config = Qwen3VLTextConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=dict(
        rope_type="default", rope_theta=5e6, mrope_section=section, mrope_interleaved=True))
    ids = torch.randint(0, 4000, (3, 2, 9))
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), ids)
    ours = Rotary(128, 5e6, mrope_section=section, mrope_interleaved=True)(ids, torch.float32)
    close(ours[0][:, :, 0], cos)
    close(ours[1][:, :, 0], sin)
    axes = Rotary(128, 5e6, mrope_section=section, mrope_interleaved=True).band_axes()
    assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2] and axes[60:].tolist() == [0, 0, 0, 0]
    contiguous = Rotary(128, 5e6, mrope_section=section)(ids, torch.float32)
    assert (contiguous[0][:, :, 0] - cos).abs().max() > 0.1


def test_edge_level_circuits_find_deepstack_edges(pair):
    """Circuits run on Qwen3-VL with a sender per DeepStack layer (``visual_in{l}``; exactness and the hand-written
    references are in tests/circuits/test_deepstack.py): EAP-IG and ACDC keep DeepStack edges of both layers in a
    faithful circuit."""
    from mm_lens.circuits import discover

    _, _, model = pair
    clean, corrupted = (model.to_inputs(random_image(seed, size=SIZES[0]), PROMPT) for seed in (0, 3))
    circuit = discover(model, clean, corrupted, lambda logits: logits[:, -1, 7] - logits[:, -1, 9], prune="acdc",
                       curve=False, progress=False)
    deepstack = [e.name for e in circuit.edges if e.sender.startswith("visual_in")]
    assert deepstack and {n.split("@")[0] for n in deepstack} == {"visual_in0", "visual_in1"}, circuit.edge_names
    assert circuit.faithfulness > 0.5


def test_embedding_noise_on_image_positions_warns_that_deepstack_keeps_the_image(pair):
    from mm_lens.analysis.corruptions import embedding_noise_hook

    _, _, model = pair
    inputs = model.to_inputs(random_image(1, size=SIZES[0]), PROMPT)
    with pytest.warns(UserWarning, match="DeepStack"):
        embedding_noise_hook(model, inputs, "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedding_noise_hook(model, inputs, "last")  # a text position: nothing bypasses the noise there
