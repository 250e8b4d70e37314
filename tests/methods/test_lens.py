import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import COPY_LAYER, TARGET_WORD, copy_head_model, copy_inputs, patch_position  # noqa: E402

from mm_lens.analysis import logit_lens  # noqa: E402
from mm_lens.analysis.lens import decode  # noqa: E402
from mm_lens.testing import tiny_llava_next, tiny_llava_towers  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = copy_head_model()
    return model, copy_inputs(model)


def test_marked_patch_decodes_to_target_at_every_layer(setup):
    model, inputs = setup
    res = logit_lens(model, inputs, positions="image", words=[TARGET_WORD], top_k=3)
    p = patch_position(model, inputs)
    i = res.positions.tolist().index(p)
    target = model.to_single_token(TARGET_WORD)
    assert res.top_tokens.shape == (model.cfg.n_layers + 1, 16, 3)
    assert (res.top_tokens[:, i, 0] == target).all()
    # the marked patch is the one that names the target, at every layer
    assert (res.word_probs[:, :, 0].argmax(-1) == i).all()
    grid = res.patch_grid(0)
    assert grid[2][1] == TARGET_WORD
    assert res.share_naming([TARGET_WORD])[0] == pytest.approx(1 / 16)
    df = res.to_frame()
    assert len(df) == (model.cfg.n_layers + 1) * 16 * 3
    from mm_lens.viz.interaction import plot_logit_lens_grid

    fig = plot_logit_lens_grid(res, layers=[0, 2])
    texts = {(t.get_position()): t.get_text() for t in fig.axes[0].texts}
    assert len(texts) == 16 and texts[(1 + 0.5, 2 + 0.5)] == TARGET_WORD


def test_last_position_reads_target_only_after_the_copy_layer(setup):
    model, inputs = setup
    res = logit_lens(model, inputs, positions="last", words=[TARGET_WORD])
    probs = res.word_probs[:, 0, 0]
    assert (probs[: COPY_LAYER + 1] < 0.2).all()
    assert (probs[COPY_LAYER + 1:] > 0.9).all()


def test_final_layer_matches_model_logits_and_flag(setup):
    model, inputs = setup
    logits, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    res = logit_lens(model, cache, positions="last", layers=[n], inputs=inputs, top_k=4)
    expect_p, expect_t = logits[0, -1].softmax(-1).topk(4)
    assert torch.equal(res.top_tokens[0, 0], expect_t)
    torch.testing.assert_close(res.top_probs[0, 0], expect_p, atol=1e-5, rtol=1e-5)
    h = cache[f"blocks.{n - 1}.hook_resid_post"][0, -1]
    raw = logit_lens(model, cache, positions="last", layers=[n], inputs=inputs, apply_ln_final=False, top_k=1)
    assert int(raw.top_tokens[0, 0, 0]) == int(decode(model, h, apply_ln_final=False).argmax())
    with pytest.raises(ValueError):
        logit_lens(model, cache, positions="last")


# ---------------------------------------------------------------- against Hugging Face, default processing
HF_CASES = {
    "llama-clip": lambda: tiny_llava_towers("llama", "clip", seed=9),
    "phi-clip": lambda: tiny_llava_towers("phi", "clip", seed=9, n_kv_heads=4),  # LayerNorm: writes centred too
    "phi-next": lambda: tiny_llava_next("phi", "clip", seed=9, n_kv_heads=4),  # and image_newline
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_lens_equals_hugging_face_hidden_states_times_lm_head_with_default_processing(case):
    """Zhang et al.'s lens is ``hidden_states[l] @ lm_head.weight.T`` (+ its bias); with the final norm,
    ``lm_head(norm(hidden_states[l]))``. A model loaded with TransformerLens' default processing (norms
    folded, writes and unembedding centred, value biases folded) must give the same probabilities."""
    from mm_lens import HookedVLM
    from mm_lens.testing import random_image

    hf, proc = HF_CASES[case]()
    model = HookedVLM.from_hf(hf, proc, device="cpu")  # the default: every processing flag on
    assert model.cfg.normalization_type.endswith("Pre")
    image = random_image(3, size=(40, 70))
    prompt = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
    enc = proc(images=image, text=prompt, return_tensors="pt")
    out = hf(**enc, output_hidden_states=True)
    inputs = model.to_inputs(image, prompt)
    n, k = model.cfg.n_layers, 5
    layers = list(range(n))
    lm = hf.model.language_model
    head, norm = hf.lm_head, getattr(lm, "norm", None) or lm.final_layernorm
    everything = list(range(inputs.shape[1]))
    for apply_ln_final in (False, True):
        res = logit_lens(model, inputs, positions=everything, layers=layers, apply_ln_final=apply_ln_final, top_k=k)
        for li, layer in enumerate(layers):
            h = out.hidden_states[layer][0]
            ref = head(norm(h) if apply_ln_final else h).softmax(-1)
            p, t = ref.topk(k)
            torch.testing.assert_close(res.top_probs[li], p, atol=2e-5, rtol=1e-4)
            assert (res.top_tokens[li, :, 0] == t[:, 0]).all()
    # decode gives the checkpoint's logits themselves (not only up to a shift) after the norm
    logits, cache = model.run_with_cache(inputs)
    h = cache[f"blocks.{n - 1}.hook_resid_post"][0]
    torch.testing.assert_close(decode(model, h), out.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0].log_softmax(-1), out.logits[0].log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_lens_from_a_cache_on_a_centred_layernorm_tower_needs_the_write_activations():
    from mm_lens import HookedVLM
    from mm_lens.analysis.unprocessed import ResidualMeans
    from mm_lens.testing import random_image

    hf, proc = tiny_llava_towers("phi", "clip", seed=9, n_kv_heads=4)
    model = HookedVLM.from_hf(hf, proc, device="cpu")
    inputs = model.to_inputs(random_image(3), "USER: <image>\nwhat is the color of the circle ? ASSISTANT:")
    _, partial = model.run_with_cache(inputs, names_filter=lambda name: "resid" in name)
    with pytest.raises(ValueError, match="center_writing_weights"):
        logit_lens(model, partial, positions="last", inputs=inputs, apply_ln_final=False)
    _, full = model.run_with_cache(inputs)
    from_cache = logit_lens(model, full, positions="image", inputs=inputs, apply_ln_final=False)
    direct = logit_lens(model, inputs, positions="image", apply_ln_final=False)
    torch.testing.assert_close(from_cache.top_probs, direct.top_probs)
    assert ResidualMeans(model, inputs).from_cache(full).at(2).abs().max() > 1e-3  # centring did remove something
