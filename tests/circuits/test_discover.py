"""discover / verify / Circuit: the whole pipeline on the bundled and the constructed models, exports, options."""

import json

import pytest
import torch

from mm_lens.circuits import Circuit, discover, verify
from mm_lens.circuits.faithfulness import MIB_FRACTIONS, FaithfulnessCurve, area, faithfulness_curve, top_edges
from mm_lens.circuits.graph import prune_dangling
from mm_lens.circuits.groundtruth import load
from mm_lens.circuits.pruning import acdc_prune
from mm_lens.circuits.runs import prepare
from mm_lens.testing import random_image

from .conftest import PROMPT, metric


@pytest.fixture(scope="module")
def gt():
    return load("route")


@pytest.fixture(scope="module")
def circuit(gt):
    return discover(gt.model, gt.clean, gt.corrupted, gt.metric, positions=gt.positions, progress=False)


def test_circuit_reports_its_verification(circuit, gt):
    assert circuit.faithfulness >= 0.9 and sorted(circuit.edge_names) == sorted(gt.true_edges)
    assert circuit.metric_full == pytest.approx(float(gt.metric(gt.model(gt.clean))), abs=1e-4)
    assert circuit.metric_empty == pytest.approx(float(gt.metric(gt.model(gt.corrupted))), abs=1e-4)
    assert abs(circuit.edges[0].score) >= abs(circuit.edges[-1].score)  # most important first
    assert set(circuit.nodes) == {"input@object", "L0H0@subject", "L1H2@last", "logits@last"}
    assert "faithfulness 1.000" in repr(circuit)
    assert circuit.curve.faithfulness[-1] == pytest.approx(1.0) and circuit.curve.cpr > 0.9 and circuit.curve.cmd < 0.1


def test_json_round_trip_and_networkx(circuit, tmp_path):
    path = tmp_path / "circuit.json"
    circuit.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["edges"][0]["name"] == circuit.edges[0].name and "image_png" in data
    back = Circuit.from_json(str(path))
    assert back.edge_names == circuit.edge_names and back.faithfulness == circuit.faithfulness
    assert back.image.size == circuit.image.size and back.curve.cpr == pytest.approx(circuit.curve.cpr)
    g = circuit.to_networkx()
    assert g.number_of_edges() == len(circuit.edges) and g.number_of_nodes() == len(circuit.nodes)
    assert g.nodes["L1H2@last"]["layer"] == 1 and g.nodes["L1H2@last"]["group"] == "last"
    assert g.edges["L0H0@subject", "L1H2@last", "v"]["score"] < 0
    assert list(circuit.to_frame().columns) == ["edge", "sender", "receiver", "slot", "score"]


def test_verify_a_named_circuit(gt):
    named = verify(gt.model, gt.clean, gt.corrupted, gt.metric, gt.true_edges[:2], positions=gt.positions)
    assert named.faithfulness == pytest.approx(0.0, abs=1e-4)  # the route is cut before the logits
    assert named.method == "given"


def test_acdc_pruning_removes_what_does_not_matter(gt):
    runs = prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)
    scores = torch.rand(runs.graph.n_edges, generator=torch.Generator().manual_seed(0))
    keep = runs.graph.mask_of(gt.true_edges) | (scores > 0.97)  # the truth plus ~100 useless edges
    pruned = acdc_prune(runs, keep, scores, tau=0.01)
    assert pruned.nonzero().flatten().tolist() == runs.graph.mask_of(gt.true_edges).nonzero().flatten().tolist()


def test_faithfulness_curve_follows_mib(gt):
    runs = prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)
    scores = torch.zeros(runs.graph.n_edges)
    scores[runs.graph.mask_of(gt.true_edges)] = torch.tensor([-3.0, -2.0, -1.0])
    curve = faithfulness_curve(runs, scores)
    assert curve.fractions == list(MIB_FRACTIONS)
    k = [int(f * runs.graph.n_edges) for f in MIB_FRACTIONS]
    assert k[0] == 3 and curve.faithfulness[0] == pytest.approx(1.0, abs=1e-5)  # 0.1% of 3940 edges: the truth
    expected_cpr = sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(MIB_FRACTIONS, MIB_FRACTIONS[1:],
                                                                     curve.faithfulness, curve.faithfulness[1:]))
    assert curve.cpr == pytest.approx(expected_cpr) and curve.cmd == pytest.approx(
        area(MIB_FRACTIONS, [abs(1 - f) for f in curve.faithfulness]))
    signed = faithfulness_curve(runs, -scores, absolute=False)  # -score ranks the helpful edges last
    assert signed.faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert FaithfulnessCurve([0, 1], [0, 1], [0.0, 1.0]).cpr == 0.5


def test_top_edges_drop_dangling_edges(gt):
    runs = prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)
    truth = runs.graph.mask_of(gt.true_edges)
    scores = truth.float()
    scores[runs.graph.edge_index["input@object->L2H0@object.v"]] = 0.5  # a head at the object never reaches the logits
    assert torch.equal(top_edges(runs.graph, scores, 4), truth)
    assert int(top_edges(runs.graph, scores, 4, prune=False).sum()) == 4
    assert torch.equal(prune_dangling(runs.graph, truth), truth)


def test_batches_mean_ablation_and_bad_input(model):
    clean = model.to_inputs([random_image(0), random_image(2)], [PROMPT] * 2)
    corrupted = model.to_inputs([random_image(1), random_image(3)], [PROMPT] * 2)
    c = discover(model, clean, corrupted, metric, method="eap", positions=["image"], n_edges=30, curve=False,
                 progress=False)
    assert 0 < len(c.edges) <= 30 and c.metric_full == pytest.approx(float(metric(model(clean)).mean()), abs=1e-4)
    mean = discover(model, clean, corrupted, metric, positions=["image"], n_edges=30, ablation="mean", curve=False,
                    progress=False)
    assert mean.ablation == "mean" and mean.metric_empty != pytest.approx(c.metric_empty)
    with pytest.raises(ValueError, match="barely changes"):
        discover(model, clean, clean, metric, progress=False)
    with pytest.raises(ValueError, match="hook_embed"):
        discover(model, clean, corrupted, metric, corrupted_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)])
    with pytest.raises(ValueError, match="prune"):
        discover(model, clean, corrupted, metric, prune="greedy")
    with pytest.raises(ValueError, match="same shape"):
        discover(model, clean, model.to_inputs(random_image(1), PROMPT), metric)


def test_the_bundled_model(tmp_path):
    """On the shapes model with every patch a node: the circuit runs through the asked object's patch."""
    from mm_lens import load_toy
    from mm_lens.analysis import corruptions
    from mm_lens.toy import data

    model = load_toy()
    ex = data.make_examples(4, seed=3, kinds=("color",))[1]
    clean = model.to_inputs(ex.image, ex.prompt)
    clean.meta.update(question=ex.question, box=ex.box)
    answer = model.to_single_token(ex.answer)
    c = discover(model, clean, corruptions.mask_region(model, clean, ex.box),
                 lambda logits: logits[:, -1].log_softmax(-1)[:, answer], patches=True, progress=False)
    row, col = divmod(next(o.cell for o in ex.objects if o.color == ex.answer), data.CELLS)
    image_nodes = {n.split("@")[1] for n in c.nodes if n.startswith("input@img")}
    assert image_nodes == {f"img {row},{col}"} and c.faithfulness >= 0.9
    assert c.curve.cpr > 0.9
