"""The ground-truth suite: each model's true edges carry the whole clean-corrupted difference, every other
edge does nothing, and discovery finds exactly the true edges."""

import pytest
import torch

from mm_lens.circuits import discover
from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.groundtruth import SUITE, load
from mm_lens.circuits.runs import prepare


@pytest.fixture(scope="module", params=list(SUITE))
def case(request):
    gt = load(request.param)
    return gt, prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)


def test_the_corruption_changes_the_answer(case):
    gt, _ = case
    for inputs, word in ((gt.clean, gt.answer), (gt.corrupted, gt.corrupted_answer)):
        assert gt.model.tokenizer.decode([int(gt.model(inputs)[0, -1].argmax())]) == word


def test_the_true_edges_carry_everything_and_each_one_is_needed(case):
    gt, runs = case
    keep = runs.graph.mask_of(gt.true_edges)
    assert runs.faithfulness(keep) == pytest.approx(1.0, abs=1e-5)
    for name in gt.true_edges:
        without = keep.clone()
        without[runs.graph.edge_index[name]] = False
        assert runs.faithfulness(without) == pytest.approx(0.0, abs=1e-4), name


def test_other_edges_alone_do_nothing(case):
    gt, runs = case
    truth = runs.graph.mask_of(gt.true_edges)
    others = (~truth).nonzero().flatten()
    sample = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:25]]
    every = torch.ones(runs.graph.n_edges, dtype=torch.bool)
    full = float(runs.clean_metric)
    for i in sample.tolist():
        keep = every.clone()
        keep[i] = False
        assert abs(float(runs.evaluate(keep)) - full) < 1e-4, runs.graph.edges[i].name
    assert float(runs.evaluate(~truth)) == pytest.approx(float(runs.empty_metric), abs=1e-4)  # all but the truth


@pytest.mark.slow
def test_every_other_edge_does_nothing(case):
    gt, runs = case
    truth = runs.graph.mask_of(gt.true_edges)
    every = torch.ones(runs.graph.n_edges, dtype=torch.bool)
    for i in (~truth).nonzero().flatten().tolist():
        keep = every.clone()
        keep[i] = False
        assert abs(float(runs.evaluate(keep)) - float(runs.clean_metric)) < 1e-4, runs.graph.edges[i].name


def test_discovery_finds_exactly_the_true_edges(case):
    gt, _ = case
    circuit = discover(gt.model, gt.clean, gt.corrupted, gt.metric, positions=gt.positions, target=0.99, curve=False,
                       progress=False)
    assert sorted(circuit.edge_names) == sorted(gt.true_edges)
    assert circuit.faithfulness == pytest.approx(1.0, abs=1e-5)


def test_eap_ig_approaches_exact_patching_on_a_one_edge_path():
    """copy_head: the object's input edge is the only way the corruption acts, so integrated gradients along the
    input path converge to the exact effect of patching that edge (EAP, one step, is 20% off)."""
    gt = load("copy_head")
    runs = prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)
    i = runs.graph.edge_index["input@object->L1H0@last.v"]
    keep = torch.ones(runs.graph.n_edges, dtype=torch.bool)
    keep[i] = False
    exact = float(runs.evaluate(keep) - runs.clean_metric)
    errors = [abs(float(edge_attribution(runs, "eap-ig", steps=s)[i]) - exact) for s in (1, 4, 32)]
    assert errors[0] > 0.1 * abs(exact)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3 * abs(exact)
