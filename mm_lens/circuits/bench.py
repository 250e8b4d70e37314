"""Score every localisation method on the ground-truth suite: how well each recovers the true edges.

For each model of :mod:`mm_lens.circuits.groundtruth` and each method of
:mod:`mm_lens.circuits.localisation`: the AUROC of the edge scores against the true edge set (every
edge of the position-aware graph is a candidate; ties count half, as in the Mann-Whitney statistic),
and the precision among the top ``k`` edges for ``k`` = the size of the true circuit (ties broken
uniformly at random, in expectation). ``mm-lens bench-methods`` prints the table.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from mm_lens.circuits.groundtruth import SUITE, load
from mm_lens.circuits.localisation import METHODS
from mm_lens.circuits.runs import prepare


def auroc(scores: Tensor, truth: Tensor) -> float:
    """Probability that a true edge outscores a false one (ties count half)."""
    scores, truth = scores.double(), truth.bool()
    ranks = _average_ranks(scores)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both true and false edges")
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def precision_at_k(scores: Tensor, truth: Tensor, k: Optional[int] = None) -> float:
    """Share of true edges among the ``k`` best (default ``k`` = number of true edges), ties in expectation."""
    truth = truth.bool()
    k = int(truth.sum()) if k is None else k
    threshold = torch.sort(scores, descending=True).values[k - 1]
    above, tied = scores > threshold, scores == threshold
    expected = float(truth[above].sum()) + (k - int(above.sum())) * float(truth[tied].sum()) / int(tied.sum())
    return expected / k


def bench(models: Sequence[str] = tuple(SUITE), methods: Sequence[str] = tuple(METHODS), progress: bool = False):
    """A DataFrame: one row per (model, method) with ``auroc``, ``precision`` (at the true circuit's size),
    ``n_true``, ``n_edges`` and ``seconds``."""
    import pandas as pd
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    rows = []
    with torch.no_grad():
        for name in models:
            gt = load(name)
            runs = prepare(gt.model, gt.clean, gt.corrupted, gt.metric, gt.positions)
            truth = runs.graph.mask_of(gt.true_edges)
            for method in tqdm(methods, desc=name, disable=not progress):
                start = time.perf_counter()
                scores = METHODS[method](runs).float()
                rows.append(dict(model=name, method=method, auroc=auroc(scores, truth),
                                 precision=precision_at_k(scores, truth), n_true=int(truth.sum()),
                                 n_edges=runs.graph.n_edges, seconds=time.perf_counter() - start))
    return pd.DataFrame(rows)


def table(df, value: str = "auroc") -> str:
    """A markdown table: methods as rows, models as columns, ``AUROC / precision`` in each cell."""
    models = list(dict.fromkeys(df["model"]))
    lines = ["| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for method in dict.fromkeys(df["method"]):
        cells = []
        for m in models:
            row = df[(df["model"] == m) & (df["method"] == method)].iloc[0]
            cells.append(f"{row['auroc']:.3f} / {row['precision']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
