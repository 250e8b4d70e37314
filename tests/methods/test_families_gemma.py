"""Every method on Gemma 3 and LLaVA-OneVision, with no family-specific code in the analysis: activation patching
(fast engine against TransformerLens' full-forward patching; Gemma 3's bidirectional image groups make the engine
resume at an image's first position), path patching (engine against full forwards), attention knockout with
object / non-object groups from a box, causal tracing, the logit lens, attention to the image, the visual-token
budget (mask and remove modes). One tiny model per family: Gemma 3 with two images (several image groups, longer
than its sliding window), OneVision with one tiled image (reduced map) and with two images (multi-image mode)."""

import pytest
import torch
from transformer_lens import patching as tl_patching

from mm_lens import HookedVLM
from mm_lens.analysis import (
    activation_patch,
    attention_knockout,
    attention_to_image,
    causal_trace,
    corruptions,
    groups,
    logit_lens,
    path_patch,
)
from mm_lens.testing import random_image, tiny_gemma3, tiny_llava_onevision
from tests.methods.conftest import EXACT

IMAGES = [random_image(20, size=(64, 80)), random_image(21, size=(60, 44))]
OTHER = [random_image(22, size=(64, 80)), random_image(23, size=(60, 44))]
BOX = (8, 4, 40, 30)  # x0, y0, x1, y1 in the first image's pixels
FAMILIES = {
    "gemma3": (lambda: tiny_gemma3(seed=3), 2,
               "USER: <start_of_image> <start_of_image>\nwhat is the color of the circle ? ASSISTANT:"),
    "onevision": (lambda: tiny_llava_onevision(seed=3, anyres_max=2), 1,
                  "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"),
    "onevision-multi": (lambda: tiny_llava_onevision(seed=3, anyres_max=2), 2,
                        "USER: <image> <image>\nwhat is the color of the circle ? ASSISTANT:"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, n_images, prompt = FAMILIES[request.param]
    hf, processor = build()
    model = HookedVLM.from_hf(hf, processor, **EXACT)
    clean = model.to_inputs(IMAGES[:n_images], prompt)
    clean.meta.update(question="the color of the circle", box=BOX)
    corrupt = corruptions.other_image(model, clean, OTHER[:n_images]) if clean.pixel_values.ndim == 4 else \
        model.to_inputs(OTHER[:n_images], prompt)
    answer = int(model(clean)[0, -1].argmax())
    return request.param, model, clean, corrupt, answer


def _metric(answer):
    return lambda logits: logits[:, -1].log_softmax(-1)[:, answer].mean()


def test_activation_patching_fast_equals_transformer_lens(family):
    name, model, clean, corrupt, answer = family
    metric = _metric(answer)
    _, clean_cache = model.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    result = activation_patch(model, clean, corrupt, metric, fast=True, progress=False)
    assert result.meta["fast"]
    torch.testing.assert_close(result.values, expected.float(), atol=1e-4, rtol=0)
    assert float(result.values.abs().max()) > 1e-3  # the patches matter
    if name == "gemma3":  # a patch inside an image changes the image's earlier positions too
        run, _ = __import__("mm_lens.analysis.fast_patch", fromlist=["capture"]).capture(model, corrupt)
        image = clean.positions[0].images[0]
        assert run.resume_at(int(image[2])) == int(image[0])


def test_head_patching_by_group_fast_equals_full_forwards(family):
    _, model, clean, corrupt, answer = family
    kwargs = dict(hook="z", heads=True, positions=["image", "last"], progress=False)
    fast = activation_patch(model, clean, corrupt, _metric(answer), fast=True, **kwargs)
    full = activation_patch(model, clean, corrupt, _metric(answer), fast=False, **kwargs)
    torch.testing.assert_close(fast.values, full.values, atol=1e-4, rtol=0)


def test_path_patching_fast_equals_full_forwards(family):
    _, model, clean, corrupt, answer = family
    kwargs = dict(senders="heads", receivers="logits", sender_positions="image", receiver_positions="last")
    fast = path_patch(model, clean, corrupt, _metric(answer), fast=True, **kwargs)
    full = path_patch(model, clean, corrupt, _metric(answer), fast=False, **kwargs)
    torch.testing.assert_close(fast.values, full.values, atol=1e-4, rtol=0)


def test_object_groups_and_knockout(family):
    name, model, clean, _, _ = family
    row = clean.positions[0]
    obj = groups.resolve(model, clean, "object")
    non = groups.resolve(model, clean, "non_object")
    first = set(row.images[0].tolist())
    newlines = set(row.named.get("image_newline", torch.zeros(0)).tolist())
    assert set(obj.tolist()) | set(non.tolist()) == first - newlines and not set(obj.tolist()) & set(non.tolist())
    assert row.patch(0, 0) in obj.tolist() and row.patch(*[s - 1 for s in row.grid_shape]) in non.tolist()
    result = attention_knockout(model, clean, source="object", target="question", window=3, progress=False)
    assert result.values.shape == (model.cfg.n_layers,) and bool(torch.isfinite(result.values).all())
    edge = attention_knockout(model, clean, source="image", target="last", window=model.cfg.n_layers, progress=False)
    assert float(edge.values.abs().max()) > 0


def test_causal_trace(family):
    _, model, clean, _, answer = family
    trace = causal_trace(model, clean, corrupt="question", how="noise", layers=[0, 1], progress=False)
    assert trace.target == answer
    assert trace.scores.shape[:2] == (3, 2) and bool(torch.isfinite(trace.scores).all())
    assert trace.p_corrupt != pytest.approx(trace.p_clean)
    # restoring resid_pre at layer 0 where nothing was corrupted changes nothing; on a corrupted token, something
    untouched = ~torch.isin(trace.positions, trace.corrupted_positions)
    resid0 = trace.module("resid")[0]
    torch.testing.assert_close(resid0[untouched], torch.full_like(resid0[untouched], trace.p_corrupt), atol=1e-5,
                               rtol=0)
    assert float((resid0[~untouched] - trace.p_corrupt).abs().max()) > 1e-4


def test_logit_lens_on_image_positions(family):
    _, model, clean, _, _ = family
    lens = logit_lens(model, clean, positions="image")
    image = clean.positions[0].image
    assert lens.top_tokens.shape[:2] == (model.cfg.n_layers + 1, len(image))
    logits = model(clean)[0, image]  # the last layer's lens is the model's own prediction there
    assert torch.equal(lens.top_tokens[-1, :, 0], logits.argmax(-1).cpu())
    assert lens.grid[0] == (0, 0) and lens.grid_shape == clean.positions[0].grid_shape


def test_attention_to_image(family):
    _, model, clean, _, _ = family
    att = attention_to_image(model, clean, queries="last")
    _, cache = model.run_with_cache(clean)
    image = clean.positions[0].image
    for l in range(model.cfg.n_layers):
        expected = cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1][:, image].sum(-1)
        torch.testing.assert_close(att.mass[l], expected, atol=1e-5, rtol=0)


def test_token_budget_modes(family):
    """Dropping image tokens by masking their keys (with the family's own mask: groups, window) or by removing
    them: keeping every token gives the full run's loss; keeping none, mask and remove agree (nothing of the
    image is read either way)."""
    from mm_lens.analysis.token_budget import _example, _losses

    name, model, clean, _, _ = family
    ex = _example(model, clean)
    n = len(clean.positions[0].image)
    everything = [torch.arange(n)]
    masked, removed = _losses(model, ex, everything, "mask"), _losses(model, ex, everything, "remove")
    torch.testing.assert_close(masked, removed, atol=1e-4, rtol=0)
    if name != "gemma3":  # without a window the two modes agree whatever is kept
        half = [torch.arange(0, n, 2)]
        torch.testing.assert_close(_losses(model, ex, half, "mask"), _losses(model, ex, half, "remove"), atol=1e-4,
                                   rtol=0)
