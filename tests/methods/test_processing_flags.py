"""Every method gives the same result whatever the weight-processing flags (within 1e-4).

One Hugging Face model, converted twice: with TransformerLens' default processing (``fold_ln``,
``center_writing_weights``, ``center_unembed``, ``fold_value_biases``) and with none. Towers: a
Llama (RMSNorm: no centring of writes, no biases), a Phi-2 (LayerNorm with biases: every flag
changes raw activations) and a Phi-2 LLaVA-NeXT (the ``image_newline`` write as well).
"""

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.analysis import (
    activation_patch,
    attention_contribution,
    attention_knockout,
    attention_to_image,
    causal_trace,
    corruptions,
    groups,
    logit_lens,
    modality_similarity,
    multedit,
    visual_token_budget,
)
from mm_lens.testing import random_image, tiny_llava_next, tiny_llava_onevision, tiny_llava_towers
from tests.conftest import NO_PROCESSING

PROMPT = "USER: <image>\nwhat is the color of this building ? ASSISTANT:"
TOWERS = {
    "llama": lambda: tiny_llava_towers("llama", "clip", seed=21),
    "phi": lambda: tiny_llava_towers("phi", "clip", seed=21, n_kv_heads=4),
    "phi-next": lambda: tiny_llava_next("phi", "clip", seed=21, n_kv_heads=4),
}


@pytest.fixture(scope="module", params=list(TOWERS))
def twins(request):
    hf, proc = TOWERS[request.param]()
    processed = HookedVLM.from_hf(hf, proc, device="cpu")
    exact = HookedVLM.from_hf(hf, proc, device="cpu", **NO_PROCESSING)
    assert processed.cfg.normalization_type.endswith("Pre") and not exact.cfg.normalization_type.endswith("Pre")
    image = random_image(4, size=(40, 70))
    return processed, exact, image


def _inputs(model, image, prompt=PROMPT):
    x = model.to_inputs(image, prompt)
    x.meta.update(question="what is the color of this building ?", box=(10, 5, 40, 30))
    return x


def _logit_lens(model, image, apply_ln_final):
    res = logit_lens(model, _inputs(model, image), positions=groups.as_group("text") | "image",
                     words=["red", "cat", "building"], apply_ln_final=apply_ln_final)
    return [res.top_probs, res.word_probs, res.top_tokens[..., 0].float()]


def _budget(model, image):
    x = _inputs(model, image, PROMPT + " red")
    x.meta["answer"] = "red"
    n = len(x.positions.image)
    frame = visual_token_budget(model, x, keep=[n, 5, 0], strategy=["stride", "attention"], progress=False).frame
    return [torch.tensor(frame.loss.values)]


def _patch(model, image):
    clean = _inputs(model, image)
    corrupt = corruptions.pixel_noise(clean, std=1.0)
    answer = int(model(clean)[0, -1].argmax())
    res = activation_patch(model, clean, corrupt, lambda logits: logits[:, -1].log_softmax(-1)[:, answer],
                           hook="resid_pre", positions=["image", "last"], progress=False)
    return [res.values]


def _edit(model, image):
    x = _inputs(model, image)
    edit = multedit(model, x, target="purple", layer=0, constraint="this building")
    # published: ||delta|| is 1e-4 ||W k|| of the checkpoint's W_out, whatever the flags
    published = multedit(model, x, target="purple", layer=0, constraint="this building", published=True)
    delta = published.value - published.key @ model.blocks[0].mlp.W_out.float()
    return [torch.tensor(edit.report[["p_target_before", "p_target_after", "p_original_after"]].values),
            1e4 * delta.norm()[None]]


METHODS = {
    "logit_lens": lambda m, im: _logit_lens(m, im, True),
    "logit_lens_no_ln_final": lambda m, im: _logit_lens(m, im, False),
    "attention_to_image": lambda m, im: [attention_to_image(m, _inputs(m, im), queries="question").per_patch],
    "attention_contribution": lambda m, im: [
        attention_contribution(m, _inputs(m, im), source="image", target="question").norms,
        attention_contribution(m, _inputs(m, im), source=groups.question("this building"), target="last").norms],
    "modality_similarity": lambda m, im: list(vars(modality_similarity(m, _inputs(m, im), n_pairs=300)).values())[1:6],
    "causal_trace_replace": lambda m, im: [causal_trace(m, _inputs(m, im), corrupt="this building", window=2,
                                                        progress=False).scores],
    "causal_trace_noise": lambda m, im: [causal_trace(m, _inputs(m, im), corrupt="this building", how="noise",
                                                      modules=("mlp",), progress=False).scores],
    "attention_knockout": lambda m, im: [attention_knockout(m, _inputs(m, im), s, t, window=1, progress=False).values
                                         for s, t in [("image", "question"), ("object", "question"),
                                                      ("question", "last")]],
    "visual_token_budget": _budget,
    "multedit": _edit,
    "activation_patch": _patch,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_result_is_independent_of_the_processing_flags(twins, method):
    processed, exact, image = twins
    ours, reference = METHODS[method](processed, image), METHODS[method](exact, image)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)


def test_centred_writes_leave_the_residual_stream_centred_everywhere(twins):
    """``center_writing_weights`` centres every write on LayerNorm towers, LLaVA-NeXT's newline included."""
    processed, _, image = twins
    if not processed.cfg.normalization_type.startswith("LN"):
        pytest.skip("RMSNorm towers keep their writes (centring would change the output)")
    language_model = lambda name: name.startswith("blocks.") and "resid" in name  # noqa: E731
    _, cache = processed.run_with_cache(_inputs(processed, image), names_filter=language_model)
    for name, resid in cache.items():
        assert resid.mean(-1).abs().max() < 1e-5, name


def test_logit_lens_on_onevision_images_that_are_not_tiled():
    """OneVision's multi-image mode on a LayerNorm tower: the means centring removed at the image positions follow
    the packing the image pipeline gives each image (an untiled image: its base grid, then one newline)."""
    hf, proc = tiny_llava_onevision("phi", "siglip", seed=21, anyres_max=2)
    processed = HookedVLM.from_hf(hf, proc, device="cpu")
    exact = HookedVLM.from_hf(hf, proc, device="cpu", **NO_PROCESSING)
    images = [random_image(4, size=(40, 70)), random_image(5)]
    prompt = PROMPT.replace("<image>", "<image> <image>")
    results = [logit_lens(m, m.to_inputs(images, prompt), positions="image", words=["red", "building"],
                          apply_ln_final=False) for m in (processed, exact)]
    torch.testing.assert_close(results[0].word_probs, results[1].word_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0].top_probs, results[1].top_probs, atol=1e-4, rtol=1e-4)
