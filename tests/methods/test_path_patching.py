"""Path patching against Wang et al.'s definition (IOI; ARENA) written as plain hooked forwards."""

import pytest
import torch

from mm_lens.analysis.path_patching import parse_receiver, parse_sender, path_patch
from mm_lens.testing import random_image
from tests.methods.conftest import PROMPT, padded_pair

TOK = 7


def metric(logits):
    return logits[:, -1, TOK]


def _mask(inputs, group):
    """[batch, pos] booleans for None (everything), "image", "text" or "last", from the input's own map."""
    mask = torch.zeros(inputs.shape, dtype=torch.bool)
    for r, row in enumerate(inputs.positions):
        if group is None:
            mask[r] = inputs.attention_mask[r].bool()
        else:
            mask[r, {"image": row.image, "text": row.text, "last": [row.last]}[group]] = True
    return mask


def ioi_reference(model, clean, corrupted, metric, sender, receivers, send_group=None, recv_group=None,
                  freeze_mlps=False, base_hooks=()):
    """Path patching by hand, denoising (clean sender into the corrupted run), three forwards with hooks.

    (1) corrupted run with every head's z frozen at its corrupted value (MLP outputs too when
    ``freeze_mlps``) except the sender at the sender positions, which takes its clean value; MLPs and
    norms recompute; the receivers' inputs are recorded. (2) a fresh corrupted run with only the
    receivers' inputs (at the receiver positions) patched in. Returns the metric per row. ``base_hooks``
    act in every corrupted run.
    """
    L, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
    _, clean_cache = model.run_with_cache(clean)
    with model.hooks(fwd_hooks=list(base_hooks)):
        _, base_cache = model.run_with_cache(corrupted)
    send, recv = _mask(corrupted, send_group), _mask(corrupted, recv_group)
    if sender.startswith("mlp"):
        sender_name, head = f"blocks.{int(sender[3:])}.hook_mlp_out", None
    elif sender.startswith("attn"):
        sender_name, head = f"blocks.{int(sender[4:])}.attn.hook_z", None
    else:
        layer, head = (int(t) for t in sender[1:].split("H"))
        sender_name = f"blocks.{layer}.attn.hook_z"

    def frozen(x, hook):
        return base_cache[hook.name].clone()

    def sender_patch(x, hook):
        x = x.clone()
        if head is None:
            x[send] = clean_cache[hook.name][send]
        else:
            x[:, :, head][send] = clean_cache[hook.name][:, :, head][send]
        return x

    step1 = [(f"blocks.{l}.attn.hook_z", frozen) for l in range(L)]
    if freeze_mlps:
        step1 += [(f"blocks.{l}.hook_mlp_out", frozen) for l in range(L)]
    step1.append((sender_name, sender_patch))  # after the freezing hook of the same site
    if receivers == "logits":
        return metric(model.run_with_hooks(corrupted, fwd_hooks=list(base_hooks) + step1))
    receivers = [receivers] if isinstance(receivers, str) else receivers
    targets = []
    for r in receivers:
        if r.startswith("resid_pre"):
            targets.append((f"blocks.{int(r[9:])}.hook_resid_pre", None))
        else:
            layer, rest = r[1:].split("H")
            h, site = rest.split(".")
            targets.append((f"blocks.{layer}.attn.hook_{site}", int(h) if site == "q" else int(h) // (n_heads // n_kv)))
    recorded = {}

    def record(x, hook):
        recorded[hook.name] = x.clone()

    model.run_with_hooks(corrupted, fwd_hooks=list(base_hooks) + step1 + [(name, record) for name, _ in targets])

    def receiver_patch(name, h):
        def fn(x, hook):
            x = x.clone()
            if h is None:
                x[recv] = recorded[name][recv]
            else:
                x[:, :, h][recv] = recorded[name][:, :, h][recv]
            return x
        return fn

    patches = [(n, receiver_patch(n, h)) for n, h in targets]
    return metric(model.run_with_hooks(corrupted, fwd_hooks=list(base_hooks) + patches))


SENDERS = ["L0H1", "L1H2", "attn0", "mlp0", "mlp1"]


@pytest.mark.parametrize("receivers,send_group,recv_group", [
    ("logits", None, None),
    ("logits", "text", None),
    (["L2H1.q", "L2H2.k", "L2H3.v"], "image", None),  # q/k/v; k/v on kv head 1 of 2 (grouped-query attention)
    (["L1H0.q", "L2H1.q", "resid_pre2"], None, "last"),  # two receivers on one site's layer apart
    (["L2H0.k"], "image", "image"),
])
@pytest.mark.parametrize("fast", [True, False])
def test_equals_the_ioi_loop(model, pair, receivers, send_group, recv_group, fast):
    clean, corrupted = pair
    res = path_patch(model, clean, corrupted, metric, senders=SENDERS, receivers=receivers,
                     sender_positions=send_group, receiver_positions=recv_group, fast=fast, batch_patches=3,
                     progress=False)
    expected = torch.stack([ioi_reference(model, clean, corrupted, metric, s, receivers, send_group, recv_group)
                            for s in SENDERS])[:, 0]
    assert res.meta["fast"] == fast and res.meta["freeze"] == "heads"
    torch.testing.assert_close(res.values, expected, atol=1e-5, rtol=0)
    assert (expected - res.baseline).abs().max() > 1e-3  # some sender matters
    torch.testing.assert_close(res.baseline, metric(model(corrupted)), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.source_metric, metric(model(clean)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("receivers", ["logits", ["L2H1.q", "resid_pre2"]])
def test_direct_path_variant_equals_the_loop_with_mlps_frozen(model, pair, receivers):
    clean, corrupted = pair
    direct = path_patch(model, clean, corrupted, metric, senders=SENDERS, receivers=receivers, freeze="heads+mlps",
                        progress=False)
    ioi = path_patch(model, clean, corrupted, metric, senders=SENDERS, receivers=receivers, progress=False)
    expected = torch.stack([ioi_reference(model, clean, corrupted, metric, s, receivers, freeze_mlps=True)
                            for s in SENDERS])[:, 0]
    torch.testing.assert_close(direct.values, expected, atol=1e-5, rtol=0)
    # early senders reach the receivers through later MLPs too: the two definitions differ
    assert (direct.values - ioi.values).abs().max() > 1e-2
    # the last MLP has no MLP after it: both definitions agree there
    last = path_patch(model, clean, corrupted, metric, senders="mlp2", receivers="logits", progress=False)
    last_direct = path_patch(model, clean, corrupted, metric, senders="mlp2", receivers="logits",
                             freeze="heads+mlps", progress=False)
    torch.testing.assert_close(last.values, last_direct.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_the_ioi_loop(model, side):
    clean, corrupted = padded_pair(model, side)
    last = corrupted.positions.last_positions

    def row_metric(logits):
        return logits[torch.arange(logits.shape[0]), -1 if logits.shape[1] == 1 else last, TOK]

    for receivers, send_group in (("logits", "text"), (["L2H1.v", "resid_pre2"], "image")):
        res = path_patch(model, clean, corrupted, row_metric, senders=SENDERS, receivers=receivers,
                         sender_positions=send_group, progress=False)
        assert res.meta["fast"]
        expected = torch.stack([ioi_reference(model, clean, corrupted, row_metric, s, receivers, send_group)
                                for s in SENDERS])
        torch.testing.assert_close(res.per_example, expected, atol=1e-5, rtol=0)
        assert (expected - res.baseline).abs().max() > 1e-3


def test_parallel_blocks_equal_the_ioi_loop():
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_towers
    from tests.methods.conftest import EXACT

    hf, proc = tiny_llava_towers("phi", "clip", text_layers=3, vision_layers=1)
    phi = HookedVLM.from_hf(hf, proc, **EXACT).eval()
    clean = phi.to_inputs(random_image(0), PROMPT)
    corrupted = phi.to_inputs(random_image(1), PROMPT)
    for receivers in ("logits", ["L2H1.k", "L1H0.q"]):
        res = path_patch(phi, clean, corrupted, metric, senders=SENDERS, receivers=receivers, progress=False)
        expected = torch.stack([ioi_reference(phi, clean, corrupted, metric, s, receivers) for s in SENDERS])[:, 0]
        torch.testing.assert_close(res.values, expected, atol=1e-5, rtol=0)


def test_receivers_before_the_sender_see_nothing(model, pair):
    """Senders in or after a receiver's layer cannot reach it; with every head frozen nothing carries what image
    senders write at image positions to the last position's logits, nor (direct path) to a query at text positions."""
    clean, corrupted = pair
    logits = path_patch(model, clean, corrupted, metric, senders=SENDERS, sender_positions="image", progress=False)
    torch.testing.assert_close(logits.values, logits.baseline.expand_as(logits.values), atol=1e-5, rtol=0)
    kv = path_patch(model, clean, corrupted, metric, senders="heads", receivers=["L2H1.k", "L2H3.v"],
                    sender_positions="image", receiver_positions="image", progress=False)
    layer2 = kv.values[2 * model.cfg.n_heads:]
    torch.testing.assert_close(layer2, kv.baseline.expand_as(layer2), atol=1e-5, rtol=0)
    assert (kv.values - kv.baseline).abs().max() > 1e-4
    q = path_patch(model, clean, corrupted, metric, senders=["L0H0", "L1H3"], receivers="L2H0.q",
                   sender_positions="image", receiver_positions="text", freeze="heads+mlps", progress=False)
    torch.testing.assert_close(q.values, q.baseline.expand_as(q.values), atol=1e-5, rtol=0)


def test_names_are_checked(model, pair):
    assert parse_sender("L1H2", 3, 4) == ("z", 1, 2)
    assert parse_sender("mlp0", 3, 4) == ("mlp", 0, None)
    assert parse_receiver("L1H3.k", model) == ("blocks.1.attn.hook_k", 1)  # 4 heads over 2 kv heads
    with pytest.raises(ValueError, match="sender"):
        parse_sender("head3", 3, 4)
    with pytest.raises(ValueError, match="outside"):
        parse_sender("L9H0", 3, 4)
    with pytest.raises(ValueError, match="receiver"):
        parse_receiver("L1H1.x", model)
    clean, corrupted = pair
    with pytest.raises(ValueError, match="freeze must be one of"):
        path_patch(model, clean, corrupted, metric, senders="L0H1", freeze="mlps", progress=False)
    with pytest.raises(ValueError, match="is empty"):
        path_patch(model, clean, corrupted, metric, senders="L0H1", receivers="resid_pre2", receiver_positions=[],
                   progress=False)


def test_base_run_hooks_act_in_every_run(model, pair):
    """corrupted_hooks past the embedding: the base run and both steps run under them (full forwards)."""
    clean, corrupted = pair

    def nudge(x, hook):
        return x + 0.1

    hooks = [("blocks.1.hook_resid_pre", nudge)]
    res = path_patch(model, clean, corrupted, metric, senders=SENDERS, receivers="L2H1.q", corrupted_hooks=hooks,
                     progress=False)
    assert not res.meta["fast"]
    expected = torch.stack([ioi_reference(model, clean, corrupted, metric, s, "L2H1.q", base_hooks=hooks)
                            for s in SENDERS])[:, 0]
    torch.testing.assert_close(res.values, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre"):
        path_patch(model, clean, corrupted, metric, senders="L0H1", corrupted_hooks=hooks, fast=True, progress=False)
