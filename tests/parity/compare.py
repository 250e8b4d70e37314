"""The comparisons every parity test makes against its reference implementation (float32, 1e-4)."""

import torch

ATOL = 1e-4


def close(ours, ref) -> None:
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def assert_residuals_match(model, cache, hidden_states, attentions=None, where=None) -> None:
    """Every ``blocks.{l}.hook_resid_pre`` against the reference's ``hidden_states[l]`` (at the positions
    ``where`` selects, if given) and every attention pattern against ``attentions[l]``."""
    for layer in range(model.cfg.n_layers):
        ours, ref = cache[f"blocks.{layer}.hook_resid_pre"], hidden_states[layer]
        close(ours if where is None else ours[where], ref if where is None else ref[where])
        if attentions is not None:
            close(cache[f"blocks.{layer}.attn.hook_pattern"], attentions[layer])


def assert_vision_states_match(model, pixel_values, ref_hidden_states) -> None:
    """The vision tower's ``hidden_states[l]`` for every l against the reference's."""
    ours = model.vision_encoder.hidden_states(pixel_values, list(range(model.cfg.vision.n_layers + 1)))
    assert len(ours) == len(ref_hidden_states)
    for a, b in zip(ours, ref_hidden_states):
        close(a, b)


def reference_image_features(out) -> torch.Tensor:
    """The projected image features of a Hugging Face output as ``[n_feature_vectors, d_model]``, whatever
    container this transformers version returns them in (a tensor, a list per image, or ``image_outputs``)."""
    feats = getattr(getattr(out, "image_outputs", None), "pooler_output", None)
    if feats is None:
        feats = out.image_hidden_states
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def assert_image_features_match(cache, out) -> None:
    """``vision_projector.hook_out`` (every image's projected features) against the reference's."""
    ours = cache["vision_projector.hook_out"]
    close(ours.reshape(-1, ours.shape[-1]), reference_image_features(out))


def assert_padded_batch_matches(hf, processor, model, images, prompts):
    """A padded batch against the reference (position ids counting real tokens): input ids, the logits of both
    attention paths (eager under the cache, SDPA without) and every residual stream at the real positions."""
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = model.to_inputs(images, prompts)
    assert torch.equal(inputs.input_ids, enc["input_ids"]) and inputs.padded
    out = hf(**enc, position_ids=model.position_ids(inputs.attention_mask), output_hidden_states=True)
    logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    close(logits[real], out.logits[real])
    close(model(inputs)[real], out.logits[real])
    assert_residuals_match(model, cache, out.hidden_states, where=real)
    return inputs


def assert_greedy_generation_matches(hf, processor, model, images, prompts, n: int, use_past_kv_cache: bool) -> None:
    """``model.generate`` against the reference's greedy ``generate`` on a padded batch, ``n`` new tokens."""
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ref = hf.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=processor.tokenizer.pad_token_id)
    ours = model.generate(model.to_inputs(images, prompts), max_new_tokens=n, stop_at_eos=False,
                          use_past_kv_cache=use_past_kv_cache)
    assert ours.tolist() == ref.tolist()
    assert len(set(ref[0, -n:].tolist())) > 1  # not one token repeated: the steps see their predecessors


def assert_bf16_close_to_hugging_face(hf, processor, images, prompts, processor_images=None) -> dict:
    """mm_lens loaded in bf16 (weights processed in float32) against Hugging Face in bf16 and in float32 on a padded
    batch, within the bounds of :func:`tests.parity.test_bf16_parity.assert_bf16_parity`. ``processor_images``:
    the images as the processor takes them, when that differs from ``model.to_inputs``'s ``images``."""
    import copy

    from mm_lens import HookedVLM
    from tests.parity.test_bf16_parity import assert_bf16_parity

    model = HookedVLM.from_hf(hf, processor, device="cpu", dtype=torch.bfloat16)
    enc = processor(images=images if processor_images is None else processor_images, text=prompts,
                    return_tensors="pt", padding=True)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    bf16_enc = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in enc.items()}
    ours = model(model.to_inputs(images, prompts))
    assert ours.dtype == torch.bfloat16
    return assert_bf16_parity(ours, hf_bf16(**bf16_enc).logits, hf(**enc).logits)


def assert_cache_estimate_exact(model, inputs) -> None:
    """:mod:`mm_lens.memory`'s estimate of every hook's shape equals a full cache's."""
    import mm_lens.memory as memory

    _, cache = model.run_with_cache(inputs)
    assert memory.hook_shapes(model, inputs) == {name: tuple(t.shape) for name, t in cache.items()}


def assert_conversion_strict(family, model, source: dict, missing_suffix: str, extra_key: str) -> None:
    """``family``'s key table refuses a checkpoint with a key removed (the first ending in ``missing_suffix``) and
    one added (``extra_key``), naming both."""
    import copy

    import pytest

    from mm_lens.conversion.common import load_strict

    missing = next(k for k in source if k.endswith(missing_suffix))
    del source[missing]
    source[extra_key] = torch.zeros(1)
    rules, ignore = family.conversion_rules(model.cfg, source)
    with pytest.raises(ValueError) as err:
        load_strict(copy.deepcopy(model), source, rules, ignore, family="test")
    assert missing in str(err.value) and extra_key in str(err.value)


def transpose_heads_(W: torch.Tensor) -> None:
    """In place: each head's ``[d_model, d_head]`` weight read as if it had been stored ``[d_head, d_model]`` (what a
    conversion that forgot one transpose would load); parity must then fail."""
    W.copy_(W.clone().reshape(W.shape[0], W.shape[2], W.shape[1]).transpose(1, 2))
