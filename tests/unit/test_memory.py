"""The activation pool: cached attention maps and MLP activations on reusable buffers, same values."""

import gc

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.components.activations import ACTIVATIONS, get_activation
from mm_lens.memory import ActivationPool, activation_pool
from mm_lens.testing import random_image, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT

pytestmark = pytest.mark.skipif(not activation_pool.supported, reason="the pool needs Linux (MADV_HUGEPAGE)")


@pytest.fixture
def pool_everything():
    """Pool every watched tensor, however small (the tiny test models' maps are a few KiB)."""
    saved = activation_pool.min_bytes, activation_pool.enabled
    activation_pool.min_bytes, activation_pool.enabled = 0, True
    activation_pool.clear()
    try:
        yield activation_pool
    finally:
        activation_pool.min_bytes, activation_pool.enabled = saved
        activation_pool.clear()


def _model(text: str, vision: str) -> HookedVLM:
    hf, processor = tiny_llava_towers(text, vision, seed=3)
    return HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)


def _cache(model, inputs, enabled: bool, **kwargs):
    activation_pool.enabled = enabled
    try:
        return model.run_with_cache(inputs, **kwargs)
    finally:
        activation_pool.enabled = True


def test_buffer_returns_to_the_pool_only_when_every_view_is_gone():
    pool = ActivationPool(min_bytes=0)
    t = pool.empty((3, 1000), torch.float32)
    t.fill_(2.0)
    row = t[1]
    del t
    gc.collect()
    assert pool.free_bytes == 0, "a live view must keep its buffer out of the pool"
    assert row.sum().item() == 2000.0
    del row
    assert pool.free_bytes == 12288  # 12000 bytes rounded up to whole pages
    again = pool.empty((3, 1000), torch.float32)
    assert (pool.mapped, pool.reused, pool.free_bytes) == (1, 1, 0)
    assert again.shape == (3, 1000) and again.dtype == torch.float32


def test_limit_and_clear():
    pool = ActivationPool(limit_bytes=4096, min_bytes=0)
    a, b = pool.empty((1024,), torch.float32), pool.empty((1024,), torch.float32)
    del a, b
    assert pool.free_bytes == 4096, "only one 4 KiB buffer fits under the limit"
    pool.clear()
    assert pool.free_bytes == 0
    pool.empty((1024,), torch.float32)
    assert pool.mapped == 3 and pool.reused == 0


@pytest.mark.parametrize("text,vision", [("llama", "clip"), ("phi", "siglip")])
def test_pooled_cache_equals_the_ordinary_cache(pool_everything, text, vision):
    model = _model(text, vision)
    inputs = model.to_inputs([random_image(1), random_image(2)], [PROMPT, "USER: <image>\nshape ? ASSISTANT:"])
    logits_plain, plain = _cache(model, inputs, enabled=False)
    mapped = pool_everything.mapped
    logits, pooled = _cache(model, inputs, enabled=True)
    assert pool_everything.mapped > mapped, "the watched maps and MLP activations should come from the pool"
    assert torch.equal(logits, logits_plain)
    assert set(pooled.keys()) == set(plain.keys())
    for name in plain.keys():
        assert torch.equal(pooled[name], plain[name]), name

    # a second run reuses the first run's buffers once that cache is gone, and leaves live caches alone
    kept = {name: pooled[name].clone() for name in ("blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post")}
    _, second = _cache(model, inputs, enabled=True)
    for name, value in kept.items():
        assert torch.equal(pooled[name], value), f"{name} of a live cache was overwritten"
    del pooled, second
    reused = pool_everything.reused
    _, third = _cache(model, inputs, enabled=True)
    assert pool_everything.reused > reused
    for name in plain.keys():
        assert torch.equal(third[name], plain[name]), name


def test_hooks_that_edit_pooled_tensors_and_bf16(pool_everything):
    model = _model("llama", "clip")
    inputs = model.to_inputs(random_image(1), PROMPT)

    def knock_out_first_key(pattern, hook):
        pattern[..., 0] = 0.0
        return pattern

    def scale_post(post, hook):
        return post * 0.5

    hooks = [("blocks.1.attn.hook_pattern", knock_out_first_key), ("blocks.0.mlp.hook_post", scale_post),
             ("vision_encoder.blocks.0.attn.hook_pattern", knock_out_first_key)]
    results = []
    for enabled in (False, True):
        activation_pool.enabled = enabled
        try:
            results.append(model.run_with_hooks(inputs, fwd_hooks=hooks))
        finally:
            activation_pool.enabled = True
    assert torch.equal(results[0], results[1])

    model.to(torch.bfloat16)
    plain = _cache(model, inputs, enabled=False)[1]
    pooled = _cache(model, inputs, enabled=True)[1]
    for name in plain.keys():
        assert torch.equal(pooled[name], plain[name]), name


def test_no_pool_when_autograd_records_the_op(pool_everything):
    model = _model("llama", "clip")
    inputs = model.to_inputs(random_image(1), PROMPT)
    mapped = pool_everything.mapped
    with torch.enable_grad():
        logits, cache = model.run_with_cache(inputs)
        logits[0, -1].logsumexp(-1).backward()
    assert pool_everything.mapped == mapped
    assert logits.requires_grad and cache["blocks.0.attn.hook_pattern"].shape[-1] == inputs.shape[1]
    assert model.blocks[0].attn.W_Q.grad is not None


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_write_out_with_the_same_values(name):
    act = get_activation(name)
    x = torch.randn(50, 70, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    assert act(x, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, act(x))
