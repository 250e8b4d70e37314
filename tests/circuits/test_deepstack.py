"""Edge-level circuits on Qwen3-VL: DeepStack's vision features (``blocks.{l}.hook_visual_in``) are senders
``visual_in{l}`` read by the blocks after l and the logits. Exact patching against the model's own run and
interventions written out as plain hooks (tests/circuits/reference.py), EAP scores against gradient x difference
computed here with hooks, the senders summing to each receiver's input, pruning, export and the diagram."""

import re

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.circuit import Circuit
from mm_lens.circuits.discovery import verify
from mm_lens.circuits.graph import Edge, prune_dangling
from mm_lens.circuits.runs import prepare
from mm_lens.testing import random_image
from mm_lens.testing_qwen import PROMPT, tiny_qwen_vl
from mm_lens.viz.circuit import COLORS

from .conftest import EXACT, metric
from .reference import input_gradient, positions, sender_output
from .test_edge_patching import caches, check_one_edge, keep_all_but

QUESTION = "what is the color of the circle ?"
EDGES = [  # every receiver input a DeepStack sender reaches, from both DeepStack layers, within and across groups
    "visual_in0@image->L1H0@image.q", "visual_in0@image->L1H1@last.k", "visual_in0@image->L1H2@question.v",
    "visual_in0@image->L2H3@last.v", "visual_in1@image->L2H2@last.v", "visual_in1@image->L2H1@last.k",
    "visual_in0@image->mlp1@image",
]  # (in the last layer only what reaches the last position moves the metric)


@pytest.fixture(scope="module")
def model():
    """A tiny random Qwen3-VL: 3 layers, DeepStack features added after blocks 0 and 1."""
    hf, processor = tiny_qwen_vl("3", seed=11)
    return HookedVLM.from_hf(hf, processor, device="cpu", **EXACT).eval()


@pytest.fixture(scope="module")
def pair(model):
    clean = model.to_inputs(random_image(0), PROMPT)
    corrupted = model.to_inputs(random_image(3), PROMPT)
    clean.meta["question"] = QUESTION
    return clean, corrupted


@pytest.fixture(scope="module")
def runs(model, pair):
    return prepare(model, *pair, metric)


def test_deepstack_senders_are_read_only_after_their_block(runs):
    graph = runs.graph
    assert graph.n_deepstack == 2
    assert graph.components.index("visual_in0") == graph.components.index("mlp0") + 1
    senders = {e.sender for e in graph.edges if e.sender.startswith("visual_in")}
    assert senders == {"visual_in0@image", "visual_in1@image"}  # image positions only
    for e in graph.edges:
        if e.sender.startswith("visual_in"):
            layer = int(e.sender[9])
            receiver = e.receiver.split("@")[0]
            assert receiver == "logits" or int(re.search(r"\d+", receiver).group()) > layer, e.name
    assert "visual_in0@image->L1H0@image.q" in graph.edge_index
    for name in ("visual_in1@image->L1H0@image.q", "visual_in0@image->mlp0@image", "visual_in0@question->mlp1@question"):
        assert name not in graph.edge_index


def test_every_edge_kept_is_the_clean_run_and_none_the_corrupted_run(model, pair, runs):
    clean, corrupted = pair
    n = runs.graph.n_edges
    full, corrupt = float(metric(model(clean))), float(metric(model(corrupted)))
    assert float(runs.evaluate(torch.ones(n, dtype=torch.bool))) == pytest.approx(full, abs=1e-5)
    assert float(runs.evaluate(torch.zeros(n, dtype=torch.bool))) == pytest.approx(corrupt, abs=1e-5)
    assert abs(full - corrupt) > 0.3  # the pair does differ
    mean = prepare(model, clean, corrupted, metric, ablation="mean")  # the mean of one corrupted run is that run
    assert float(mean.evaluate(torch.zeros(n, dtype=torch.bool))) == pytest.approx(corrupt, abs=1e-5)


def test_a_padded_batch_is_exact_row_by_row(model):
    prompts = [PROMPT, PROMPT.replace(" what is the color of the circle ?", " what ?")]
    clean = model.to_inputs([random_image(0), random_image(2)], prompts)
    corrupted = model.to_inputs([random_image(3), random_image(4)], prompts)
    assert clean.padded
    runs = prepare(model, clean, corrupted, metric)
    n = runs.graph.n_edges
    torch.testing.assert_close(runs.evaluate(torch.ones(n, dtype=torch.bool)), metric(model(clean)), atol=1e-5, rtol=0)
    torch.testing.assert_close(runs.evaluate(torch.zeros(n, dtype=torch.bool)), metric(model(corrupted)), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", EDGES)
def test_one_patched_deepstack_edge_matches_the_hand_written_intervention(model, pair, runs, name):
    check_one_edge(model, pair, runs, name)


def test_patching_every_edge_of_a_deepstack_sender_is_patching_hook_visual_in(model, pair, runs):
    """Every reader of the residual stream is a receiver, so patching all of visual_in0's edges is the clean run
    with the corrupted run's hook_visual_in of block 0."""
    corrupted_cache, _ = caches(model, pair)
    out = [e.name for e in runs.graph.edges if e.sender.startswith("visual_in0@")]
    corrupted_visual = corrupted_cache["blocks.0.hook_visual_in"]
    expected = metric(model.run_with_hooks(pair[0], fwd_hooks=[("blocks.0.hook_visual_in",
                                                                lambda x, hook: corrupted_visual)]))
    assert float(runs.evaluate(keep_all_but(runs, *out))) == pytest.approx(float(expected), abs=2e-5)
    assert abs(float(expected) - float(runs.clean_metric)) > 1e-3


def test_the_senders_into_each_receiver_sum_to_its_input(model, pair, runs):
    """The decomposition the edges rest on: the outputs of a receiver's senders (the embedding, heads, MLPs and the
    DeepStack features before it; plus the attention biases, which belong to no head) are its input."""
    _, cache = caches(model, pair)
    graph = runs.graph
    outputs = torch.stack([sender_output(model, cache, c) for c in graph.components])
    for slot in graph.slots:
        l = slot.layer
        if slot.kind in ("q", "mlp"):
            name = f"blocks.{l}.hook_resid_pre" if slot.kind == "q" else f"blocks.{l}.hook_mlp_in"
            actual = cache[name]
        elif slot.kind == "logits":
            actual = cache[f"blocks.{l - 1}.hook_resid_post"]  # block 2 is no DeepStack layer: nothing added after
        else:
            continue
        heads_done = l + (slot.kind == "mlp" or slot.kind == "logits")
        bias = sum((model.blocks[i].attn.b_O for i in range(min(heads_done, graph.n_layers))), torch.zeros(1))
        torch.testing.assert_close(outputs[:slot.n_senders].sum(0) + bias, actual, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runs.clean_acts.stacked(model, slot.n_senders), outputs[:slot.n_senders])


def test_eap_scores_of_deepstack_edges_are_gradient_times_difference(model, pair, runs):
    corrupted_cache, clean_cache = caches(model, pair)
    scores = edge_attribution(runs, "eap")
    image = positions(runs.graph.groups, "image")
    for name in EDGES:
        edge = Edge.parse(name)
        s_comp = edge.sender.split("@")[0]
        diff = sender_output(model, corrupted_cache, s_comp) - sender_output(model, clean_cache, s_comp)
        grad = input_gradient(model, pair[0], runs.graph.groups, edge, metric)
        expected = float((diff[:, image] * grad[:, image]).sum())
        assert float(scores[runs.graph.edge_index[name]]) == pytest.approx(expected, rel=1e-3, abs=1e-6), name
        assert abs(expected) > 1e-5, f"{name}: a zero score is a weak test"


def test_eap_ig_moves_the_deepstack_features_with_the_embedding(model, pair, runs):
    """EAP-IG with 2 steps: the gradient averaged at the midpoint and at the clean run, where the embedding and
    every hook_visual_in go from the corrupted run's values to the clean run's together."""
    corrupted_cache, clean_cache = caches(model, pair)
    scores = edge_attribution(runs, "eap-ig", steps=2)
    name = "visual_in0@image->L2H3@last.v"
    edge = Edge.parse(name)
    diff = corrupted_cache["blocks.0.hook_visual_in"] - clean_cache["blocks.0.hook_visual_in"]
    grads = []
    for alpha in (0.5, 1.0):
        hooks = [(n, lambda x, hook, n=n, a=alpha: corrupted_cache[n] + a * (clean_cache[n] - corrupted_cache[n]))
                 for n in ("hook_embed", "blocks.0.hook_visual_in", "blocks.1.hook_visual_in")]
        grads.append(input_gradient(model, pair[0], runs.graph.groups, edge, metric, hooks))
    image = positions(runs.graph.groups, "image")
    expected = float((diff[:, image] * (grads[0] + grads[1])[:, image] / 2).sum())
    assert float(scores[runs.graph.edge_index[name]]) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert abs(expected - float((diff[:, image] * grads[1][:, image]).sum())) > 1e-6  # the midpoint counts


def test_pruning_keeps_paths_that_start_at_a_deepstack_sender(runs):
    graph = runs.graph
    path = ["visual_in1@image->L2H0@last.v", "L2H0@last->logits@last"]
    dangling = "L1H0@image->L2H1@image.q"  # L2H1@image reaches no logits
    keep = prune_dangling(graph, graph.mask_of(path + [dangling]))
    assert [graph.edges[i].name for i in keep.nonzero().flatten()] == sorted(path, key=graph.edge_index.get)


def test_a_circuit_with_deepstack_edges_exports_and_draws_them(model, pair):
    edges = ["visual_in0@image->L1H0@last.v", "visual_in1@image->L2H0@last.v", "L1H0@last->logits@last",
             "L2H0@last->logits@last", "input@last->L1H0@last.q"]
    circuit = verify(model, *pair, metric, edges)
    assert sorted(circuit.edge_names) == sorted(edges)
    again = Circuit.from_json(circuit.to_json())
    assert sorted(again.edge_names) == sorted(edges) and "visual_in1@image" in again.nodes
    html = circuit.diagram().to_html()
    nodes = dict(re.findall(r'<g class="node" data-n="([^"]+)".*?<circle cx="([\d.]+)"', html))
    assert {"visual_in0@image", "visual_in1@image"} <= set(nodes)
    assert html.count(f'fill="{COLORS["visual_in"]}"') == 2  # drawn as DeepStack features, not as heads
    # in the image lane, at their layer: after block 0's (block 1's) heads, before block 1's (the logits)
    ys = dict(re.findall(r'<g class="node" data-n="([^"]+)".*?<circle cx="[\d.]+" cy="([\d.]+)"', html))
    lanes = {name: (float(y), float(y) + float(h)) for y, h, name in re.findall(
        r'<rect class="lane" x="0" y="([\d.]+)" width="\d+" height="([\d.]+)"[^>]*/><text[^>]*>([^<]+)</text>', html)}
    for n in ("visual_in0@image", "visual_in1@image"):
        assert lanes["image"][0] < float(ys[n]) < lanes["image"][1]
    x = {n: float(v) for n, v in nodes.items()}
    assert x["L1H0@last"] < x["visual_in1@image"] < x["L2H0@last"] < x["logits@last"]
    assert x["input@last"] < x["visual_in0@image"] < x["L1H0@last"]


PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var root = document.querySelector('.mm-circuit'), out = {lanes: {}, nodes: {}};
  root.querySelectorAll('rect.lane').forEach(function (r) {
    var box = r.getBoundingClientRect();
    out.lanes[r.nextElementSibling.textContent] = [box.top, box.bottom];
  });
  root.querySelectorAll('.node').forEach(function (n) {
    var box = n.querySelector('circle, rect').getBoundingClientRect();
    out.nodes[n.dataset.n] = [box.left + box.width / 2, box.top + box.height / 2, box.width];
  });
  var locator = root.querySelector('.locator');
  root.querySelector('.node[data-n="visual_in1@image"]').dispatchEvent(new Event('mouseenter'));
  out.locator_hover = getComputedStyle(locator).display;
  document.body.setAttribute('data-probe', JSON.stringify(out));
}, 300); });
</script></body>"""


@pytest.mark.slow
def test_deepstack_nodes_render_in_the_image_lane_in_headless_chromium(model, pair, tmp_path):
    from .test_diagram import probe_in_chromium

    circuit = verify(model, *pair, metric, ["visual_in0@image->L1H0@last.v", "visual_in1@image->L2H0@last.v",
                                            "L1H0@last->logits@last", "L2H0@last->logits@last"])
    probe, _ = probe_in_chromium(circuit, PROBE, tmp_path)
    nodes, (top, bottom) = probe["nodes"], probe["lanes"]["image"]
    for n in ("visual_in0@image", "visual_in1@image"):
        x, y, width = nodes[n]
        assert width > 0 and top < y < bottom, (n, nodes[n], probe["lanes"])
    assert nodes["visual_in0@image"][0] < nodes["L1H0@last"][0] < nodes["visual_in1@image"][0] < nodes["L2H0@last"][0]
    assert probe["locator_hover"] == "inline"  # an image node: hovering shows where the region is
