"""The circuits machinery on every family's tiny model (tests/families.py), each against an independent reference:
exact verification with every edge kept / none kept against the model's own clean / corrupted runs (mean ablation
too), one patched edge of each receiver kind (q, k, v, MLP, logits) against the intervention written out as plain
hooks (tests/circuits/reference.py), EAP scores of q, k, v and MLP edges against gradient x (corrupted - clean
sender output) computed by hand with hooks (the gradient goes through each family's own key norm, rotary at its own
position ids (M-RoPE on Qwen-VL) and sliding-window masks), and the senders into each receiver summing to its
input. Groups: image, question, last (and other)."""

import pytest
import torch

from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.graph import Edge
from mm_lens.circuits.runs import prepare
from tests.families import FAMILIES, MORE_FAMILIES, make_case

from .reference import input_gradient, metric_with_edge, positions, post_norm, sender_output
from .test_edge_patching import keep_all_but

GROUPS = ["image", "question"]
# one edge into each receiver input kind, within and across groups, from senders whose output the corruption changes;
# {a}, {b}: the last two layers (every family has 2+; on Gemma 3 a sliding layer's last position does not see the image)
EDGES = [
    "input@image->L0H0@image.q", "L{a}H1@last->L{b}H0@last.q", "input@image->L1H1@last.k",
    "input@image->L0H1@question.k", "mlp0@image->L1H2@last.v", "input@image->L0H3@question.v",
    "input@image->mlp0@image", "L{a}H3@last->mlp{b}@last", "L1H1@last->logits@last", "mlp{b}@last->logits@last",
]
EAP_EDGES = [e for e in EDGES if not e.endswith("logits@last")]


def named(template, model):
    return template.format(a=model.cfg.n_layers - 2, b=model.cfg.n_layers - 1)


def metric(logits):
    """The last position's logits along a fixed random direction: every component moves it."""
    direction = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(0))
    return logits[:, -1] @ direction.to(logits.dtype)


@pytest.fixture(scope="module", params=list(FAMILIES) + list(MORE_FAMILIES))
def family(request):
    model, clean, corrupted = make_case(request.param)
    runs = prepare(model, clean, corrupted, metric, positions=GROUPS)
    caches = model.run_with_cache(corrupted)[1], model.run_with_cache(clean)[1]
    return request.param, model, clean, corrupted, runs, caches


def test_every_edge_kept_is_the_clean_run_and_none_the_corrupted_run(family):
    _, model, clean, corrupted, runs, _ = family
    n = runs.graph.n_edges
    full, corrupt = float(metric(model(clean))), float(metric(model(corrupted)))
    assert abs(full - corrupt) > 0.02, "the pair does not differ: a weak test"
    assert float(runs.evaluate(torch.ones(n, dtype=torch.bool))) == pytest.approx(full, abs=1e-4)
    assert float(runs.evaluate(torch.zeros(n, dtype=torch.bool))) == pytest.approx(corrupt, abs=1e-4)
    mean = prepare(model, clean, corrupted, metric, positions=GROUPS, ablation="mean")  # one run: its mean is it
    assert float(mean.evaluate(torch.zeros(n, dtype=torch.bool))) == pytest.approx(corrupt, abs=1e-4)


@pytest.mark.parametrize("template", EDGES)
def test_one_patched_edge_matches_the_hand_written_intervention(family, template):
    _, model, clean, _, runs, (corrupted_cache, clean_cache) = family
    name = named(template, model)
    expected = metric_with_edge(model, clean, corrupted_cache, clean_cache, runs.graph.groups, Edge.parse(name), metric)
    got = runs.evaluate(keep_all_but(runs, name))
    assert float(got) == pytest.approx(float(expected), abs=5e-5)
    assert abs(float(got) - float(runs.clean_metric)) > 1e-4, "the edge changes nothing: a weak test"


def test_eap_scores_are_gradient_times_difference(family):
    _, model, clean, _, runs, (corrupted_cache, clean_cache) = family
    scores = edge_attribution(runs, "eap")
    groups = runs.graph.groups
    for name in (named(t, model) for t in EAP_EDGES):
        edge = Edge.parse(name)
        s_comp, s_group = edge.sender.split("@")
        at = positions(groups, s_group)
        diff = sender_output(model, corrupted_cache, s_comp) - sender_output(model, clean_cache, s_comp)
        grad = input_gradient(model, clean, groups, edge, metric)
        expected = float((diff[:, at] * grad[:, at]).sum())
        assert float(scores[runs.graph.edge_index[name]]) == pytest.approx(expected, rel=1e-3, abs=1e-5), name
        assert abs(expected) > 1e-4, f"{name}: a zero score is a weak test"


def test_eap_through_soft_capped_attention_scores():
    """Attention-score soft-capping (Gemma 2's ``cap * tanh(s / cap)``), set on a tiny LLaVA: key and query edges'
    EAP scores still equal gradient x difference (the gradient through the model's own capped forward)."""
    model, clean, corrupted = make_case("llava-1.5")
    for block in model.blocks:
        block.attn.softcap = 2.0  # small: most scores are capped hard
    runs = prepare(model, clean, corrupted, metric, positions=GROUPS)
    corrupted_cache, clean_cache = model.run_with_cache(corrupted)[1], model.run_with_cache(clean)[1]
    scores = edge_attribution(runs, "eap")
    for name in ("input@image->L1H1@last.k", "input@image->L0H1@question.k", "input@image->L0H0@image.q"):
        edge = Edge.parse(name)
        at = positions(runs.graph.groups, "image")
        diff = sender_output(model, corrupted_cache, "input") - sender_output(model, clean_cache, "input")
        expected = float((diff[:, at] * input_gradient(model, clean, runs.graph.groups, edge, metric)[:, at]).sum())
        assert float(scores[runs.graph.edge_index[name]]) == pytest.approx(expected, rel=1e-3, abs=1e-5), name
        assert abs(expected) > 1e-4


def test_the_senders_into_each_receiver_sum_to_its_input(family):
    _, model, _, _, runs, (_, cache) = family
    graph = runs.graph
    outputs = torch.stack([sender_output(model, cache, c) for c in graph.components])
    for slot in graph.slots:
        l = slot.layer
        if slot.kind == "q":
            actual = cache[f"blocks.{l}.hook_resid_pre"]
        elif slot.kind == "mlp":
            actual = cache[f"blocks.{l}.hook_mlp_in"]
        elif slot.kind == "logits":
            actual = cache[f"blocks.{l - 1}.hook_resid_post"] + (cache[f"blocks.{l - 1}.hook_visual_in"]
                                                                  if l - 1 < graph.n_deepstack else 0)
        else:
            continue
        heads_done = l + (slot.kind == "logits" or (slot.kind == "mlp" and not graph.parallel))
        bias = sum((post_norm(model, cache, i, model.blocks[i].attn.b_O) for i in range(min(heads_done, graph.n_layers))),
               torch.zeros(1))
        torch.testing.assert_close(outputs[:slot.n_senders].sum(0) + bias, actual, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, at=f"{slot.kind}{l}": f"{at}: {m}")
        torch.testing.assert_close(runs.clean_acts.stacked(model, slot.n_senders), outputs[:slot.n_senders],
                                   atol=1e-5, rtol=1e-5)  # and they are what mm_lens.circuits takes them to be
