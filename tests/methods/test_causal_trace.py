import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import COPY_LAYER, copy_head_model, copy_inputs, hooked, patch_position  # noqa: E402

from mm_lens.analysis import causal_trace, groups  # noqa: E402
from mm_lens.analysis.causal_trace import window_layers  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402


@pytest.fixture(scope="module")
def copy_model():
    model = copy_head_model()
    return model, copy_inputs(model)


def test_window_conventions():
    assert window_layers(5, 1, 12, "centered") == [5]
    assert window_layers(5, 1, 12, "trailing") == [5]
    assert window_layers(5, 4, 12, "centered") == [3, 4, 5, 6]
    assert window_layers(0, 5, 12, "centered") == [0, 1, 2]
    assert window_layers(5, 3, 12, "trailing") == [3, 4, 5]
    assert window_layers(1, 3, 12, "trailing") == [0, 1]
    # the published multimodal_trace.py: --window 1 is one layer, w > 1 is l-w .. l+w
    assert window_layers(5, 1, 12) == window_layers(5, 1, 12, "published") == [5]
    assert window_layers(5, 2, 12, "published") == [3, 4, 5, 6, 7]
    assert window_layers(11, 2, 12, "published") == [9, 10, 11]
    assert window_layers(0, 3, 12, "published") == [0, 1, 2, 3]
    for bad in [dict(mode="both"), dict(mode="symmetric"), dict(window=0)]:
        with pytest.raises(ValueError):
            window_layers(0, bad.get("window", 1), 12, bad.get("mode", "published"))


def test_copy_head_trace_finds_the_patch_and_the_head(copy_model):
    model, inputs = copy_model
    p, last = patch_position(model, inputs), inputs.shape[1] - 1
    res = causal_trace(model, inputs, corrupt="image", how="noise", noise=3.0, noise_std=3.0,
                       positions=groups.at([p, 5, last]), progress=False)
    assert res.target == model.to_single_token("cat")
    assert res.p_clean > 0.99 and res.p_corrupt < 0.5
    pi, last_i = res.positions.tolist().index(p), res.positions.tolist().index(last)
    nie = res.normalized_indirect_effect
    resid, attn, mlp = (nie[res.modules.index(m)] for m in ("resid", "attn", "mlp"))
    # the marked patch matters up to the copy layer, the last position from then on
    assert (resid[: COPY_LAYER + 1, pi] > 0.9).all()
    assert (resid[COPY_LAYER + 1:, pi].abs() < 0.05).all()
    assert resid[COPY_LAYER + 1:, last_i].min() > 0.99
    assert resid[: COPY_LAYER + 1, last_i].abs().max() < 0.05
    assert resid[:, res.positions.tolist().index(5)].abs().max() < 0.2  # another image patch
    # only the copy head's output at the last position restores the answer; MLPs write nothing
    assert attn[COPY_LAYER, last_i] > 0.99
    mask = torch.ones_like(attn, dtype=torch.bool)
    mask[COPY_LAYER, last_i] = False
    assert attn[mask].abs().max() < 0.05
    torch.testing.assert_close(res.module("mlp"), torch.full_like(res.module("mlp"), res.p_corrupt))
    df = res.to_frame()
    assert len(df) == 3 * model.cfg.n_layers * 3
    from mm_lens.viz.tracing import plot_causal_trace

    fig = plot_causal_trace(res)
    heat = fig.axes[0].images[0].get_array()
    assert heat.shape == (3, model.cfg.n_layers)
    assert abs(heat - res.scores[0].T.numpy()).max() < 1e-6
    assert any(t.get_text().startswith("*") for t in fig.axes[0].get_yticklabels())


def test_token_replacement_on_a_random_model_restores_exactly_at_the_embedding(copy_model):
    model = hooked(seed=2)
    inputs = model.to_inputs(random_image(2), "USER: <image>\nwhat is this building ? ASSISTANT:")
    res = causal_trace(model, inputs, corrupt="building", modules=("resid", "mlp"), replace_token="w3",
                       progress=False)
    span = inputs.positions.span("building")
    i = res.positions.tolist().index(int(span[0]))
    assert res.corrupted_positions.tolist() == span.tolist()
    assert abs(res.p_clean - res.p_corrupt) > 1e-3
    assert res.scores[0, 0, i].item() == pytest.approx(res.p_clean, abs=1e-5)
    # positions before the corrupted token carry nothing of it
    before = [j for j, p in enumerate(res.positions.tolist()) if p < int(span[0])]
    torch.testing.assert_close(res.scores[:, :, before], torch.full_like(res.scores[:, :, before], res.p_corrupt),
                               atol=1e-5, rtol=0)
    # batching the restored runs changes nothing
    kw = dict(corrupt="building", modules=("mlp",), replace_token="w3", window=2, window_mode="trailing", layers=[1],
              progress=False)
    one = causal_trace(model, inputs, batch_size=1, **kw)
    many = causal_trace(model, inputs, batch_size=5, **kw)
    torch.testing.assert_close(one.scores, many.scores, atol=1e-5, rtol=0)


def test_errors_name_the_fix(copy_model):
    model, inputs = copy_model
    with pytest.raises(ValueError, match="noise"):
        causal_trace(model, inputs, corrupt="image", progress=False)
    with pytest.raises(ValueError, match="modules"):
        causal_trace(model, inputs, corrupt="circle", modules=("mlp", "ln"), progress=False)


def test_scores_equal_a_restored_run_written_by_hand(copy_model):
    model = hooked(seed=7)
    inputs = model.to_inputs(random_image(7), "USER: <image>\nwhat is the color of this building ? ASSISTANT:")
    res = causal_trace(model, inputs, corrupt="this building", modules=("attn",), window=2,
                       window_mode="centered", layers=[1], progress=False)
    pos = int(inputs.positions.span("building")[0]) + 1  # the "?" after the span
    _, clean = model.run_with_cache(inputs)
    corrupted = inputs.with_input_ids(inputs.input_ids.clone())
    corrupted.input_ids[0, inputs.positions.span("this building")] = model.tokenizer.unk_token_id

    def restore(act, hook):
        act = act.clone()
        act[0, pos] = clean[hook.name][0, pos]
        return act

    logits = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.hook_attn_out", restore) for l in (0, 1)])
    expected = logits[0, -1].softmax(-1)[res.target]
    assert res.scores[0, 0, res.positions.tolist().index(pos)].item() == pytest.approx(float(expected), abs=1e-5)


def test_llava_next_image_positions_restore_at_the_embedding():
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_next

    hf, proc = tiny_llava_next()
    model = HookedVLM.from_hf(hf, proc, fold_ln=False, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False)
    inputs = model.to_inputs(random_image(0, size=(40, 70)), "USER: <image>\nwhat is the color of the circle ? ASSISTANT:")
    one = int(inputs.positions.image[30])  # a tile position
    res = causal_trace(model, inputs, corrupt=groups.at([one]), how="noise", noise=10.0, modules=("resid",),
                       positions=groups.at([one]), layers=[0], progress=False)
    assert abs(res.p_clean - res.p_corrupt) > 1e-5
    assert res.scores[0, 0, 0].item() == pytest.approx(res.p_clean, abs=1e-7)


def test_a_corrupted_input_can_be_passed_directly(copy_model):
    from mm_lens.analysis.corruptions import other_image

    model = hooked(seed=8)
    inputs = model.to_inputs(random_image(8), "USER: <image>\nwhat is the color of the circle ? ASSISTANT:")
    same = causal_trace(model, inputs, corrupt=inputs, modules=("attn",), layers=[0], progress=False)
    assert same.p_corrupt == pytest.approx(same.p_clean, abs=1e-6)
    torch.testing.assert_close(same.scores, torch.full_like(same.scores, same.p_clean), atol=1e-5, rtol=0)
    swapped = other_image(model, inputs, [random_image(9)])
    res = causal_trace(model, inputs, corrupt=swapped, modules=("resid",), positions="last", progress=False)
    assert abs(res.p_clean - res.p_corrupt) > 1e-4
    assert res.corrupted_positions.numel() == 0  # same tokens, other pixels
    # the last token's embedding is the same in both runs: restoring it changes nothing
    assert res.scores[0, 0, 0].item() == pytest.approx(res.p_corrupt, abs=1e-6)
    with pytest.raises(ValueError, match="line up"):
        causal_trace(model, inputs, corrupt=model.to_inputs(random_image(8), "USER: <image>\nwhat ? ASSISTANT:"),
                     progress=False)


# ---------------------------------------------------------------- every window against plain hooks
def hand_window(l, w, L, mode):
    if mode == "published":
        return [l] if w == 1 else list(range(max(0, l - w), min(L, l + w + 1)))
    if mode == "centered":
        return list(range(max(0, l - w // 2), min(L, l - w // 2 + w)))
    return list(range(max(0, l - w + 1), l + 1))


@pytest.fixture(scope="module")
def deep():
    model = hooked(seed=7, text_layers=6)
    inputs = model.to_inputs(random_image(7), "USER: <image>\nwhat is the color of this building ? ASSISTANT:")
    return model, inputs


@pytest.mark.parametrize("mode", ["published", "centered", "trailing"])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_every_window_equals_a_restoration_written_with_plain_hooks(deep, mode, window):
    """The published trace by hand: the constraint span replaced by one token, then for position t and
    layer l the clean output of the module copied back at t in every layer of the window, in a full
    forward. Default positions: from the last image position (inclusive) to the last prompt token."""
    model, inputs = deep
    L = model.cfg.n_layers
    kw = dict(window=window, progress=False)  # "published" is the default
    if mode != "published":
        kw["window_mode"] = mode
    res = causal_trace(model, inputs, corrupt="this building", modules=("attn", "mlp"), replace_token="w3", **kw)
    last_image = int(inputs.positions.image.max())
    assert res.positions.tolist() == list(range(last_image, inputs.shape[1]))
    _, clean = model.run_with_cache(inputs)
    corrupted = inputs.with_input_ids(inputs.input_ids.clone())
    corrupted.input_ids[0, inputs.positions.span("this building")] = model.to_single_token("w3")
    for t in (last_image, int(inputs.positions.span("building")[0]), inputs.shape[1] - 1):
        for m, name in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
            for l in range(L):
                def restore(act, hook, t=t):
                    act = act.clone()
                    act[0, t] = clean[hook.name][0, t]
                    return act

                hooks = [(f"blocks.{j}.{name}", restore) for j in hand_window(l, window, L, mode)]
                p = model.run_with_hooks(corrupted, fwd_hooks=hooks)[0, -1].softmax(-1)[res.target]
                got = res.scores[res.modules.index(m), l, res.positions.tolist().index(t)]
                assert float(got) == pytest.approx(float(p), abs=1e-5), (m, l, t)


def test_noise_corruption_is_k_times_the_unit_draw(deep):
    from mm_lens.analysis.corruptions import embedding_noise_hook

    model, inputs = deep
    span = inputs.positions.span("this building")
    k = 1.7
    res = causal_trace(model, inputs, corrupt="this building", how="noise", noise=k, seed=3, modules=("mlp",),
                       layers=[1], positions="last", progress=False)
    _, unit = embedding_noise_hook(model, inputs, groups.at(span), k=1.0, seed=3)

    def noised(embed, hook):
        return embed + k * (unit(embed, hook) - embed)

    p = model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", noised)])[0, -1].softmax(-1)[res.target]
    assert res.p_corrupt == pytest.approx(float(p), abs=1e-6)
    assert abs(res.p_clean - res.p_corrupt) > 1e-3
