"""The activation-cache estimate (from the config and the input's shape) against the actual cache of tiny
models on CPU, hook by hook; the clear error run_with_cache gives instead of running out of device memory;
and what the estimate says for LLaVA-1.5-7B on a 16 GB GPU."""

from types import SimpleNamespace

import pytest
import torch

import mm_lens.memory as memory
from mm_lens import HookedVLM
from mm_lens.conversion.build import skeleton
from mm_lens.testing import random_image, tiny_gemma3, tiny_llava_next, tiny_llava_onevision, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT

MODELS = {
    "llama-clip-gqa": lambda: tiny_llava_towers("llama", "clip", seed=1, n_kv_heads=2),
    "phi-siglip-parallel": lambda: tiny_llava_towers("phi", "siglip", seed=1, vision_feature_layer=[-3, -1]),
    "llava-next": lambda: tiny_llava_next(seed=1),
    "gemma3": lambda: tiny_gemma3(seed=1),  # pooled projector, q/k and sandwich norms
    "onevision": lambda: tiny_llava_onevision(seed=1),  # reduced tile maps
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    hf, processor = MODELS[request.param]()
    return HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def actual_shapes(cache) -> dict:
    return {name: tuple(t.shape) for name, t in cache.items()}


def inputs_for(model, images=2):
    imgs = [random_image(1), random_image(2, size=(60, 30))][:images]
    prompts = [PROMPT, "USER: <image>\nwhere is the red square ? ASSISTANT:"][:images]
    placeholder = getattr(model.processor, "image_token", "<image>")  # Gemma 3: <start_of_image>
    return model.to_inputs(imgs, [p.replace("<image>", placeholder) for p in prompts])


def test_every_hook_and_shape(model):
    inputs = inputs_for(model)
    _, cache = model.run_with_cache(inputs)
    assert memory.hook_shapes(model, inputs) == actual_shapes(cache)
    nbytes = sum(t.numel() * t.element_size() for t in cache.values())
    assert memory.cache_bytes(model, inputs) == {torch.device("cpu"): nbytes}


def test_attention_results_text_only_and_stopping_early(model):
    import copy

    model = copy.deepcopy(model)
    model.set_use_attn_result(True)
    text = model.to_inputs(None, "what is the color of the circle ?")
    _, cache = model.run_with_cache(text)
    assert memory.hook_shapes(model, text) == actual_shapes(cache)
    _, cache = model.run_with_cache(text, stop_at_layer=1)
    assert memory.hook_shapes(model, text, stop_at_layer=1) == actual_shapes(cache)


@pytest.mark.parametrize("names_filter", ["blocks.0.hook_resid_post", ["hook_embed", "blocks.1.attn.hook_pattern"],
                                          lambda name: name.endswith("hook_z")])
def test_names_filter(model, names_filter):
    inputs = inputs_for(model, images=1)
    _, cache = model.run_with_cache(inputs, names_filter=names_filter)
    nbytes = sum(t.numel() * t.element_size() for t in cache.values())
    assert memory.cache_bytes(model, inputs, names_filter) == {torch.device("cpu"): nbytes} and nbytes > 0


def test_a_cache_that_cannot_fit_is_a_clear_error(model, monkeypatch):
    """The check runs before the forward: with (pretend) half the memory free the full cache is refused with the numbers,
    a filtered one still runs, and no hook is left attached."""
    inputs = inputs_for(model, images=1)
    need = sum(memory.cache_bytes(model, inputs).values()) + inputs.shape[1] * model.cfg.d_vocab * 4  # + logits
    monkeypatch.setattr(memory, "free_bytes", lambda device: need // 2)
    with pytest.raises(ValueError, match=rf"~{need / 2**20:.1f} MiB of activations and logits on cpu.*only "
                                         rf"{need // 2 / 2**20:.1f} MiB is free.*names_filter.*device='cpu'"):
        model.run_with_cache(inputs)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_post")


def test_images_and_prompts_as_arguments(model, monkeypatch):
    """run_with_cache(images, prompts) builds the inputs once, checks them, and runs them."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10**12)
    logits, cache = model.run_with_cache(random_image(1), PROMPT, names_filter="hook_embed")
    torch.testing.assert_close(logits, model(random_image(1), PROMPT))


def test_llava_7b_on_a_16gb_gpu():
    """LLaVA-1.5-7B in bfloat16 on a 600-token prompt (one 336 px image): weights ~13.2 GiB, so a 16 GB card
    (~14.7 GiB usable) leaves ~1.5 GiB: the residual stream at every layer fits, the full cache does not."""
    from benchmarks.bench_load import llava_config
    from mm_lens.conversion.llava import translate_config

    cfg = translate_config(llava_config("7b")).replace(dtype=torch.bfloat16)
    model = skeleton(HookedVLM, cfg)
    weights = sum(p.numel() for p in model.parameters()) * 2
    inputs = SimpleNamespace(shape=(1, 600), pixel_values=torch.empty(1, 3, 336, 336, device="meta"))
    full = sum(memory.cache_bytes(model, inputs).values())
    resid = sum(memory.cache_bytes(model, inputs, lambda n: n.endswith("hook_resid_post")).values())
    assert 13.0 < weights / 2**30 < 13.5
    assert resid < 0.2 * 2**30 < 1.5 * 2**30 < full
