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
