"""Every method on every family's tiny model, each against an independent reference, with no special case
in the analysis code: activation patching on the fast engine (TransformerLens' patching functions), path
patching (the IOI loop by hand), attention knockout with object/non-object groups from a box (the published
definition by hand), causal tracing (a restored run by hand), the logit lens and attention to the image (the
cached activations read directly). Qwen-VL runs with M-RoPE position ids (3 axes) throughout (Qwen3-VL interleaved,
with DeepStack features added after its first blocks); Idefics3, SmolVLM and InternVL with tiled images (object
groups in every tile and the whole-image view).

A new family adds one :class:`~tests.families.Family` to :data:`tests.families.FAMILIES`.
"""

import pytest
import torch
from transformer_lens import patching as tl_patching

from mm_lens.analysis import attention_to_image, causal_trace, knockout_edges, logit_lens, path_patch
from mm_lens.analysis.groups import resolve
from mm_lens.analysis.knockout import PAPER_EDGES
from mm_lens.analysis.patching import activation_patch
from tests.families import FAMILIES, make_case
from tests.methods.test_knockout import published_knockout_probs
from tests.methods.test_patching import tl_groups
from tests.methods.test_path_patching import ioi_reference

TOK_A, TOK_B = 7, 11


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    """(model with TransformerLens' default weight processing, clean input with question and box, corrupted input)."""
    return make_case(request.param)


def logit_diff(logits):
    return logits[:, -1, TOK_A] - logits[:, -1, TOK_B]


def test_activation_patching_on_the_fast_engine_equals_transformer_lens(case):
    model, clean, corrupted = case
    _, clean_cache = model.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0])
    result = activation_patch(model, clean, corrupted, logit_diff, progress=False)
    assert result.meta["fast"] and expected.abs().max() > 1e-2
    torch.testing.assert_close(result.values, expected.float(), atol=1e-4, rtol=0)
    groups_ = ["image", "object", "last"]
    heads = activation_patch(model, clean, corrupted, logit_diff, hook="z", heads=True, positions=groups_,
                             progress=False)
    layers = list(range(model.cfg.n_layers))
    expected = tl_groups(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0], "z", layers, groups_,
                         model.cfg.n_heads)
    assert heads.meta["fast"]
    torch.testing.assert_close(heads.values, expected, atol=1e-4, rtol=0)


def test_path_patching_equals_the_ioi_loop(case):
    model, clean, corrupted = case
    metric = lambda logits: logits[:, -1, TOK_A]  # noqa: E731
    senders = ["L0H1", "L1H2", "mlp0"]
    last = model.cfg.n_layers - 1
    for receivers, send_group in (("logits", None), ([f"L{last}H1.q", f"resid_pre{last}"], "image")):
        res = path_patch(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                         sender_positions=send_group, progress=False)
        expected = torch.stack([ioi_reference(model, clean, corrupted, metric, s, receivers, send_group)
                                for s in senders])[:, 0]
        assert res.meta["fast"]
        torch.testing.assert_close(res.values, expected, atol=1e-4, rtol=0)
        assert (expected - res.baseline).abs().max() > 1e-4


def test_knockout_with_object_groups_equals_the_published_definition(case):
    model, clean, _ = case
    g = {name: resolve(model, clean, name) for name in ("image", "question", "last", "object", "non_object")}
    image = set(g["image"].tolist())
    assert 0 < len(g["object"]) < len(image) and len(g["non_object"]) > 0
    assert set(g["object"].tolist()) | set(g["non_object"].tolist()) <= image
    assert not set(g["object"].tolist()) & set(g["non_object"].tolist())
    res = knockout_edges(model, clean, PAPER_EDGES, window=1, progress=False)
    probs = model(clean)[0, -1].softmax(-1)
    answer = probs.argmax()
    for e, (src, tgt) in enumerate(PAPER_EDGES):
        for layer in range(model.cfg.n_layers):
            p = published_knockout_probs(model, clean, [(g[tgt], g[src])], [layer])[0, answer]
            expected = 100 * (p - probs[answer]) / probs[answer]
            assert float(res.values[e, layer]) == pytest.approx(float(expected), abs=1e-3)
    assert res.values.abs().max() > 1e-3


def test_causal_trace_equals_a_restored_run_by_hand(case):
    model, clean, _ = case
    unk = model.tokenizer.unk_token_id
    subject = "color of the circle"
    res = causal_trace(model, clean, corrupt=subject, replace_token=unk, modules=("mlp",), window=1, layers=[1],
                       progress=False)
    pos = int(clean.positions.span("?")[0])  # restored: the position after the corrupted word
    _, cache = model.run_with_cache(clean)
    corrupted = clean.with_input_ids(clean.input_ids.clone())
    corrupted.input_ids[0, clean.positions.span(subject)] = unk

    def restore(act, hook):
        act = act.clone()
        act[0, pos] = cache[hook.name][0, pos]
        return act

    logits = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_mlp_out", restore)])
    expected = logits[0, -1].softmax(-1)[res.target]
    assert res.scores[0, 0, res.positions.tolist().index(pos)].item() == pytest.approx(float(expected), abs=1e-5)
    assert abs(res.p_clean - res.p_corrupt) > 1e-4


def test_logit_lens_reads_the_model_at_the_last_layer(case):
    model, clean, _ = case
    n = model.cfg.n_layers
    res = logit_lens(model, clean, positions="image", top_k=1)
    rows, cols = clean.positions.grid_shape
    assert len(res.grid) == len(clean.positions.image)
    assert {(r, c) for r, c in res.grid if r >= 0} == {(r, c) for r in range(rows) for c in range(cols)}
    last = logit_lens(model, clean, positions="last", layers=[n], top_k=1)
    probs = model(clean)[0, -1].softmax(-1)
    assert int(last.top_tokens[0, 0, 0]) == int(probs.argmax())
    assert float(last.top_probs[0, 0, 0]) == pytest.approx(float(probs.max()), abs=1e-5)


def test_attention_to_image_equals_the_cached_patterns(case):
    model, clean, _ = case
    res = attention_to_image(model, clean, queries="question")
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_pattern"))
    q, image = resolve(model, clean, "question"), resolve(model, clean, "image")
    for i, layer in enumerate(res.layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, q][:, :, image]  # [head, query, image]
        torch.testing.assert_close(res.mass[i], pattern.sum(-1).mean(-1), atol=1e-6, rtol=0)
    grid = res.patch_map(0)
    assert tuple(grid.shape) == clean.positions.grid_shape
