"""nnsight traces HookedVLM: every HookPoint's output, attention patterns and scores included, without switching
the attention implementation (SDPA never calls hook_pattern; the trace asking for it takes the eager path)."""

import pytest
import torch

from mm_lens import load_toy
from mm_lens.toy import data

nnsight = pytest.importorskip("nnsight")


@pytest.fixture(scope="module")
def traced():
    model = load_toy(device="cpu")
    ex = data.make_examples(4, seed=3, kinds=("color",))[1]
    return model, nnsight.NNsight(model), model.to_inputs(ex.image, ex.prompt)


def test_trace_reads_patterns_and_scores_on_the_default_attention(traced):
    model, nn_model, inputs = traced
    assert model.cfg.attn_implementation == "auto"
    names = ["vision_encoder.blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post", "blocks.1.attn.hook_attn_scores",
             "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern"]
    logits, cache = model.run_with_cache(inputs, names_filter=names)
    with nn_model.trace(inputs):
        vision = nn_model.vision_encoder.blocks[0].attn.hook_pattern.output.save()
        resid = nn_model.blocks[0].hook_resid_post.output.save()
        scores = nn_model.blocks[1].attn.hook_attn_scores.output.save()
        pattern = nn_model.blocks[1].attn.hook_pattern.output.save()
        last = nn_model.blocks[2].attn.hook_pattern.output.save()
        out = nn_model.output.save()
    for name, got in zip(names, (vision, resid, scores, pattern, last)):
        torch.testing.assert_close(got, cache[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, logits, atol=1e-5, rtol=0)
    assert not any(block.attn.needs_eager() for block in model.blocks)  # outside a trace: SDPA again


def test_trace_edits_a_pattern_as_a_hook_does(traced):
    model, nn_model, inputs = traced
    image = inputs.positions.image

    def knock(pattern, hook=None):
        pattern = pattern.clone()
        pattern[:, :, -1, image] = 0
        return pattern

    expected = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", knock)])
    with nn_model.trace(inputs):
        nn_model.blocks[1].attn.hook_pattern.output[:, :, -1, image] = 0
        edited = nn_model.output.save()
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    assert (edited - model(inputs)).abs().max() > 1e-3
