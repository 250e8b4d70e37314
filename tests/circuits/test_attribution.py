"""EAP and EAP-IG (mm_lens.circuits.attribution) against the published definition written as plain hooks:
EAP(s -> r) = (corrupted_s - clean_s) . d metric / d input_r at the clean run, i.e. the derivative at eps = 0 of
the metric when eps x (corrupted_s - clean_s) is added to what r reads (reference.py)."""

import pytest
import torch

from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.graph import Edge
from mm_lens.circuits.runs import prepare
from mm_lens.testing import random_image

from .conftest import PROMPT, metric
from .reference import metric_with_edge
from .test_edge_patching import EDGES


def reference_eap(model, clean, corrupted, groups, name):
    """d/d eps of the metric (mean over the batch) with the edge moved eps of the way to its corrupted sender."""
    corrupted_cache, clean_cache = model.run_with_cache(corrupted)[1], model.run_with_cache(clean)[1]
    with torch.enable_grad():
        eps = torch.zeros((), requires_grad=True)
        value = metric_with_edge(model, clean, corrupted_cache, clean_cache, groups, Edge.parse(name), metric, eps)
        (grad,) = torch.autograd.grad(value.mean(), eps)
    return float(grad)


@pytest.fixture(scope="module")
def eap(runs):
    return edge_attribution(runs, "eap")


@pytest.mark.parametrize("name", EDGES)
def test_eap_equals_the_gradient_reference(model, pair, runs, eap, name):
    expected = reference_eap(model, *pair, runs.graph.groups, name)
    got = float(eap[runs.graph.edge_index[name]])
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(expected) > 1e-4


def test_eap_averages_the_batch(model):
    clean = model.to_inputs([random_image(0), random_image(2)], [PROMPT] * 2)
    corrupted = model.to_inputs([random_image(1), random_image(3)], [PROMPT] * 2)
    both = edge_attribution(prepare(model, clean, corrupted, metric, positions=["image"]), "eap")
    alone = [edge_attribution(prepare(model, model.to_inputs(random_image(i), PROMPT),
                                      model.to_inputs(random_image(i + 1), PROMPT), metric, positions=["image"]), "eap")
             for i in (0, 2)]
    assert torch.allclose(both, (alone[0] + alone[1]) / 2, atol=1e-5)


def test_eap_ig_with_one_step_is_eap(runs, eap):
    assert torch.allclose(edge_attribution(runs, "eap-ig", steps=1), eap, atol=1e-7)


def test_eap_ig_averages_the_gradient_along_the_input_path(model, pair, runs):
    """EAP-IG with 3 steps = the mean of the gradients at embed = corrupted + k/3 (clean - corrupted), k = 1, 2, 3,
    each written as a plain-hook reference on an interpolated clean run."""
    clean, corrupted = pair
    name = "input@image->L1H1@question.v"
    got = float(edge_attribution(runs, "eap-ig", steps=3)[runs.graph.edge_index[name]])
    clean_embed, corrupted_embed = runs.clean_acts.embed, runs.corrupted_acts.embed
    total = 0.0
    for k in (1, 2, 3):
        mixed = corrupted_embed + k / 3 * (clean_embed - corrupted_embed)
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook, mixed=mixed: mixed)]):
            clean_cache = model.run_with_cache(clean)[1]
            corrupted_cache = model.run_with_cache(corrupted)[1]
            # the edge's sender difference stays corrupted - clean (from the real runs)
            corrupted_cache.cache_dict["hook_embed"] = corrupted_embed
            clean_cache.cache_dict["hook_embed"] = clean_embed
            with torch.enable_grad():
                eps = torch.zeros((), requires_grad=True)
                value = metric_with_edge(model, clean, corrupted_cache, clean_cache, runs.graph.groups,
                                         Edge.parse(name), metric, eps)
                total += float(torch.autograd.grad(value.mean(), eps)[0])
    assert got == pytest.approx(total / 3, rel=1e-4)


def test_bad_arguments(runs):
    with pytest.raises(ValueError, match="method"):
        edge_attribution(runs, "acdc")
    with pytest.raises(ValueError, match="steps"):
        edge_attribution(runs, "eap-ig", steps=0)
