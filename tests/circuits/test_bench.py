"""The localisation benchmark: AUROC and precision against brute-force references, and every method's score
on every ground-truth model (thresholds just under the measured values, so a regression in any method shows)."""

import itertools

import pytest
import torch

from mm_lens.circuits.bench import auroc, bench, precision_at_k, table

# measured with `mm-lens bench-methods` (AUROC, precision at the true circuit's size)
MEASURED = {
    "copy_head": dict(eap=(1.0, 1.0), eap_ig=(1.0, 1.0), activation_patching=(0.9998, 0.667),
                      attribution_patching=(0.9999, 0.75), causal_tracing=(0.9982, 0.167), knockout=(0.9940, 0.056),
                      attention_contribution=(0.9940, 0.056), path_patching=(0.9982, 0.167)),
    "route": dict(eap=(1.0, 1.0), eap_ig=(1.0, 1.0), activation_patching=(0.9995, 0.429),
                  attribution_patching=(0.9997, 0.667), causal_tracing=(0.9938, 0.058), knockout=(0.9887, 0.033),
                  attention_contribution=(0.9880, 0.028), path_patching=(0.9970, 0.111)),
    "storage": dict(eap=(0.9999, 0.667), eap_ig=(1.0, 1.0), activation_patching=(0.9995, 0.5),
                    attribution_patching=(0.9997, 0.667), causal_tracing=(0.9968, 0.143), knockout=(0.6646, 0.056),
                    attention_contribution=(0.8235, 0.056), path_patching=(0.9979, 0.2)),
    "distractor": dict(eap=(1.0, 1.0), eap_ig=(1.0, 1.0), activation_patching=(0.9999, 0.667),
                       attribution_patching=(0.9999, 0.75), causal_tracing=(0.9987, 0.167), knockout=(0.9957, 0.056),
                       attention_contribution=(0.9924, 0.028), path_patching=(0.9985, 0.143)),
}


def brute_auroc(scores, truth):
    pos, neg = scores[truth], scores[~truth]
    return sum(float(p > n) + 0.5 * float(p == n) for p, n in itertools.product(pos.tolist(), neg.tolist())) / (
        len(pos) * len(neg))


def brute_precision(scores, truth, k):
    """Expected share of true edges in the top k over every order of the tied scores (small cases only)."""
    orders = list(itertools.permutations(range(len(scores))))
    hits = []
    for order in orders:
        ranked = sorted(order, key=lambda i: -float(scores[i]))  # stable: ties keep this permutation's order
        hits.append(float(truth[ranked[:k]].sum()) / k)
    return sum(hits) / len(hits)


def test_auroc_and_precision_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 4, (7,), generator=g).float()
        truth = torch.zeros(7, dtype=torch.bool)
        truth[torch.randperm(7, generator=g)[:3]] = True
        assert auroc(scores, truth) == pytest.approx(brute_auroc(scores, truth))
        for k in (1, 3):
            assert precision_at_k(scores, truth, k) == pytest.approx(brute_precision(scores, truth, k))
    assert auroc(torch.tensor([3.0, 2, 1]), torch.tensor([True, False, False])) == 1.0
    assert auroc(torch.tensor([1.0, 2, 3]), torch.tensor([True, False, False])) == 0.0
    with pytest.raises(ValueError, match="both"):
        auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


@pytest.fixture(scope="module")
def results():
    return bench()


@pytest.mark.parametrize("model", list(MEASURED))
def test_every_method_on_every_model(results, model):
    for method, (a, p) in MEASURED[model].items():
        row = results[(results["model"] == model) & (results["method"] == method)].iloc[0]
        assert row["auroc"] >= a - 2e-3, (model, method, row["auroc"])
        assert row["precision"] >= p - 0.02, (model, method, row["precision"])


def test_the_table_names_every_method_and_model(results):
    text = table(results)
    assert text.count("\n") == 2 + 7 and "| eap_ig | 1.000 / 1.00" in text and "storage" in text
    with pytest.raises(ValueError, match="unknown methods"):
        bench(methods=["acdc"])
