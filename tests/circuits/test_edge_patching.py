"""Exact edge patching (mm_lens.circuits.runs / forward) against interventions written out as plain hooks."""

import pytest
import torch

from mm_lens.circuits.graph import Edge

from .conftest import PROMPT, metric
from .reference import metric_with_edge, positions, sender_output

EDGES = [  # one of each receiver input, from each kind of sender, within and across position groups
    "input@image->L0H1@image.q", "L0H3@last->L2H0@last.q", "mlp0@image->L1H2@image.q",
    "input@image->L0H2@last.k", "input@image->L1H1@question.v", "L0H0@question->L2H3@last.v",
    "mlp1@image->L2H1@last.k", "L1H2@question->L2H2@last.k", "input@image->L1H0@image.v",
    "L0H2@question->mlp0@question", "mlp0@image->mlp1@image", "L1H3@last->mlp2@last",
    "L2H1@last->logits@last", "mlp1@last->logits@last", "L0H2@last->logits@last",
]


def keep_all_but(runs, *names):
    keep = torch.ones(runs.graph.n_edges, dtype=torch.bool)
    keep[runs.graph.mask_of(names)] = False
    return keep


def caches(model, pair):
    clean, corrupted = pair
    return model.run_with_cache(corrupted)[1], model.run_with_cache(clean)[1]


def test_every_edge_kept_is_the_clean_run_and_none_the_corrupted_run(model, pair, runs):
    clean, corrupted = pair
    n = runs.graph.n_edges
    assert runs.evaluate(torch.ones(n, dtype=torch.bool)) == pytest.approx(float(metric(model(clean))), abs=1e-5)
    assert runs.evaluate(torch.zeros(n, dtype=torch.bool)) == pytest.approx(float(metric(model(corrupted))), abs=1e-5)
    assert abs(float(metric(model(clean))) - float(metric(model(corrupted)))) > 0.1  # the pair does differ


def check_one_edge(model, pair, runs, name):
    """Patching the edge ``name`` alone is the hand-written intervention, and changes the metric."""
    corrupted_cache, clean_cache = caches(model, pair)
    expected = metric_with_edge(model, pair[0], corrupted_cache, clean_cache, runs.graph.groups, Edge.parse(name),
                                metric)
    got = runs.evaluate(keep_all_but(runs, name))
    assert float(got) == pytest.approx(float(expected), abs=2e-5)
    assert abs(float(got) - float(runs.clean_metric)) > 1e-4, "the edge changes nothing: a weak test"


@pytest.mark.parametrize("name", EDGES)
def test_one_patched_edge_matches_the_hand_written_intervention(model, pair, runs, name):
    check_one_edge(model, pair, runs, name)


def test_a_patched_edge_reads_its_sender_as_patched_upstream(model, pair, runs):
    """input -> L0H1@last.v patched, then L0H1@last -> logits patched: the logits receive (corrupted - current)
    of L0H1, where current is L0H1's output in this run (already changed by the first edge)."""
    clean, _ = pair
    corrupted_cache, clean_cache = caches(model, pair)
    groups = runs.graph.groups
    first = Edge.parse("input@image->L0H1@last.v")
    head = 1
    at = positions(groups, "image")
    last = positions(groups, "last")
    delta = sender_output(model, corrupted_cache, "input") - clean_cache["hook_embed"]
    mask = torch.zeros(clean.shape[1], 1)
    mask[at] = 1
    attn = model.blocks[0].attn
    kv = head // attn.repeat
    v = model.blocks[0].ln1(clean_cache["blocks.0.hook_resid_pre"] + delta * mask) @ attn._W_V[kv] + attn._b_V[kv]
    kept = {}

    def set_v(x, hook):
        x = x.clone()
        x[:, at, kv] = v[:, at]
        return x

    model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_v", set_v),
                                           ("blocks.0.attn.hook_z", lambda z, hook: kept.update(z=z[:, last, head]))])
    current = kept["z"] @ attn.W_O[head]  # L0H1's output at last in the patched run
    corrupted_out = sender_output(model, corrupted_cache, "L0H1")[:, last]

    def set_z(z, hook):
        z = z.clone()
        z[:, last, head] = kept["z"]
        return z

    def logits_edge(x, hook):
        x = x.clone()
        x[:, last] += corrupted_out - current
        return x

    L = model.cfg.n_layers
    expected = metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_z", set_z),
                                                             (f"blocks.{L - 1}.hook_resid_post", logits_edge)]))
    got = runs.evaluate(keep_all_but(runs, first.name, "L0H1@last->logits@last"))
    assert float(got) == pytest.approx(float(expected), abs=2e-5)


def test_bad_masks_and_edge_names_are_errors(runs):
    with pytest.raises(ValueError, match="bool vector"):
        runs.evaluate(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in this graph"):
        runs.graph.mask_of(["input@image->L9H0@last.q"])
    with pytest.raises(ValueError, match="sender@group"):
        Edge.parse("L0H0 to L1H1")


def test_a_padded_batch_patches_each_row_as_alone(model):
    from mm_lens.circuits.runs import prepare
    from mm_lens.testing import random_image

    prompts = [PROMPT, "USER: <image>\nwhat ? ASSISTANT:"]
    clean = model.to_inputs([random_image(0), random_image(2)], prompts)
    corrupted = model.to_inputs([random_image(1), random_image(3)], prompts)
    assert clean.padded
    name = "input@image->L1H1@last.v"
    both = prepare(model, clean, corrupted, metric, positions=["image"])
    got = both.evaluate(keep_all_but(both, name))
    for row, prompt in enumerate(prompts):
        alone = prepare(model, model.to_inputs(random_image(2 * row), prompt),
                        model.to_inputs(random_image(2 * row + 1), prompt), metric, positions=["image"])
        assert float(got[row]) == pytest.approx(float(alone.evaluate(keep_all_but(alone, name))), abs=1e-4)
    n = both.graph.n_edges
    assert torch.allclose(both.evaluate(torch.zeros(n, dtype=torch.bool)), metric(model(corrupted)), atol=1e-4)
