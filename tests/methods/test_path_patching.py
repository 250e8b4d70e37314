import pytest
import torch

from mm_lens.analysis.path_patching import parse_receiver, parse_sender, path_patch

TOK = 7


def metric(logits):
    return logits[:, -1, TOK]


def _head_delta(model, clean, corrupted, layer, head, positions=None):
    """(clean - corrupted) output of one head written to the residual stream, [batch, pos, d_model]."""
    _, cc = model.run_with_cache(clean)
    _, xc = model.run_with_cache(corrupted)
    name = f"blocks.{layer}.attn.hook_z"
    dz = cc[name][:, :, head] - xc[name][:, :, head]
    delta = dz @ model.blocks[layer].attn.W_O[head]
    if positions is not None:
        keep = torch.zeros(delta.shape[1], dtype=torch.bool)
        keep[positions] = True
        delta = delta * keep[None, :, None]
    return delta, xc


def test_head_to_logits_is_the_direct_effect(model, pair):
    clean, corrupted = pair
    res = path_patch(model, clean, corrupted, metric, senders=["L1H2", "L0H0"], receivers="logits", progress=False)
    for i, (layer, head) in enumerate([(1, 2), (0, 0)]):
        delta, xc = _head_delta(model, clean, corrupted, layer, head)
        _, full = model.run_with_cache(corrupted)
        final = full[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"] + delta
        expected = model.unembed(model.ln_final(final))[:, -1, TOK]
        assert abs(float(res.values[i]) - float(expected[0])) < 1e-4
    assert res.axes == ("sender",) and res.labels["sender"] == ["L1H2", "L0H0"]


def test_image_senders_to_text_receiver_resid(model, pair):
    """Head 1 of layer 0 at image positions -> the residual entering layer 2 at the last position."""
    clean, corrupted = pair
    image = clean.positions.image
    res = path_patch(model, clean, corrupted, metric, senders="L0H1", receivers="resid_pre2",
                     sender_positions="image", receiver_positions="last", progress=False)
    # at the last position only attention carries image information, so the direct path is
    # that head's output at the last position after the sender's image positions changed: the
    # receiver sees only what reaches it through frozen paths, i.e. nothing but the head itself
    # at the sender positions -- the last position is not an image position, so no effect.
    assert abs(float(res.values[0]) - float(res.baseline[0])) < 1e-5
    # receivers at the image positions do see it: the known answer adds the delta there
    res2 = path_patch(model, clean, corrupted, metric, senders="L0H1", receivers="resid_pre2",
                      sender_positions="image", receiver_positions="image", progress=False)
    delta, _ = _head_delta(model, clean, corrupted, 0, 1, image)

    def add(x, hook):
        return x + delta
    expected = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.2.hook_resid_pre", add)]))
    assert abs(float(res2.values[0]) - float(expected[0])) < 1e-4
    assert abs(float(res2.values[0]) - float(res2.baseline[0])) > 1e-4


def test_head_receivers_and_sweep(model, pair):
    """Senders at image positions reach receiver heads through their keys/values at image positions."""
    clean, corrupted = pair
    kv = path_patch(model, clean, corrupted, metric, senders="heads", receivers=["L2H1.k", "L2H3.v"],
                    sender_positions="image", receiver_positions="image", progress=False)
    assert kv.values.shape == (model.cfg.n_layers * model.cfg.n_heads,)
    layer2 = kv.values[2 * model.cfg.n_heads:]  # senders in the receivers' own layer cannot reach them
    torch.testing.assert_close(layer2, kv.baseline.expand_as(layer2), atol=1e-5, rtol=0)
    assert (kv.values - kv.baseline).abs().max() > 1e-4
    # a query at text positions reads the residual at text positions, where image senders write nothing
    q = path_patch(model, clean, corrupted, metric, senders=["L0H0", "L1H3"], receivers="L2H0.q",
                   sender_positions="image", receiver_positions="text", progress=False)
    torch.testing.assert_close(q.values, q.baseline.expand_as(q.values), atol=1e-5, rtol=0)


def test_names_are_checked(model):
    assert parse_sender("L1H2", 3, 4) == ("z", 1, 2)
    assert parse_sender("mlp0", 3, 4) == ("mlp", 0, None)
    assert parse_receiver("L1H3.k", model) == ("blocks.1.attn.hook_k", 1)  # 4 heads over 2 kv heads
    with pytest.raises(ValueError, match="sender"):
        parse_sender("head3", 3, 4)
    with pytest.raises(ValueError, match="outside"):
        parse_sender("L9H0", 3, 4)
    with pytest.raises(ValueError, match="receiver"):
        parse_receiver("L1H1.x", model)


@pytest.mark.parametrize("receivers,send_pos,recv_pos", [
    ("logits", None, None),  # image senders have no direct path to the last position's logits
    (["resid_pre2"], None, "last"),
    (["L1H0.q", "L1H3.q", "L2H1.k", "L2H2.v"], "image", "image"),  # two receivers on one hook; GQA k/v
    (["L2H0.q", "resid_pre1"], "image", None),
])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fast_path_equals_full_forwards(model, pair, receivers, send_pos, recv_pos, direction):
    clean, corrupted = pair
    kw = dict(senders="all", receivers=receivers, sender_positions=send_pos, receiver_positions=recv_pos,
              direction=direction, progress=False)
    fast = path_patch(model, clean, corrupted, metric, fast=True, batch_patches=5, **kw)
    slow = path_patch(model, clean, corrupted, metric, fast=False, **kw)
    assert fast.meta["fast"] and not slow.meta["fast"]
    assert fast.values.shape == (model.cfg.n_layers * (model.cfg.n_heads + 1),)
    torch.testing.assert_close(fast.values, slow.values, atol=2e-5, rtol=0)
    torch.testing.assert_close(fast.baseline, slow.baseline, atol=1e-6, rtol=0)
    assert (fast.values - fast.baseline).abs().max() > 1e-4


def test_fast_path_on_padded_batch_and_parallel_blocks(model):
    from mm_lens import HookedVLM
    from mm_lens.testing import random_image, tiny_llava_towers
    from tests.methods.conftest import EXACT, PROMPT

    hf, proc = tiny_llava_towers("phi", "clip", text_layers=3, vision_layers=1)
    phi = HookedVLM.from_hf(hf, proc, **EXACT).eval()
    prompts = [PROMPT, "USER: <image>\nwhat is this ? ASSISTANT:"]
    for m in (model, phi):
        clean = m.to_inputs([random_image(0), random_image(1)], prompts)
        corrupted = m.to_inputs([random_image(2), random_image(3)], prompts)
        assert clean.padded
        for receivers, send_pos in (("logits", "text"), (["L2H1.v", "resid_pre2"], "image")):
            kw = dict(senders="all", receivers=receivers, sender_positions=send_pos, progress=False)
            fast = path_patch(m, clean, corrupted, metric, fast=True, **kw)
            slow = path_patch(m, clean, corrupted, metric, fast=False, **kw)
            torch.testing.assert_close(fast.per_example, slow.per_example, atol=2e-5, rtol=0)
            assert (fast.per_example - fast.baseline[None]).abs().max() > 1e-4


def test_late_base_hooks_take_full_forwards(model, pair):
    clean, corrupted = pair

    def nudge(x, hook):
        return x + 0.1

    hooks = [("blocks.1.hook_resid_pre", nudge)]
    res = path_patch(model, clean, corrupted, metric, senders=["L0H1", "mlp0"], corrupted_hooks=hooks, progress=False)
    assert not res.meta["fast"]
    plain = path_patch(model, clean, corrupted, metric, senders=["L0H1", "mlp0"], progress=False)
    assert (res.baseline - plain.baseline).abs().max() > 1e-4
    with pytest.raises(ValueError, match="hook_embed"):
        path_patch(model, clean, corrupted, metric, senders="L0H1", corrupted_hooks=hooks, fast=True, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        path_patch(model, clean, corrupted, metric, senders="L0H1", receivers="resid_pre2", receiver_positions=[],
                   progress=False)
