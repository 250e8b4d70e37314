"""Faithfulness of circuits chosen by score, and its curve over circuit size (MIB's measures).

Faithfulness (Mueller et al., "MIB: A Mechanistic Interpretability Benchmark", 2025, circuit-localisation
track): ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))``, where ``m(C)`` is the metric when only the
circuit's edges keep their clean values (:meth:`~mm_lens.circuits.runs.Runs.evaluate`), ``m(full)`` the
clean model and ``m(empty)`` every edge patched. The curve takes the top ``k`` edges by score for
MIB's fractions of the graph (0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%), drops edges that no
longer lie on an input-to-logits path (as MIB's ``prune``), and integrates with the trapezoidal rule
over the fraction of edges:

* CPR ("circuit performance ratio", higher is better) = area under ``f``; MIB ranks by signed scores
  for it (``absolute=False`` here: the edges whose patching lowers the metric most come first);
* CMD ("circuit-model difference", lower is better) = area under ``|1 - f|``; MIB ranks by absolute
  scores for it (``absolute=True``, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.circuits.graph import Graph, prune_dangling
from mm_lens.circuits.runs import Runs

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def ranking(scores: Tensor, absolute: bool = True) -> Tensor:
    """Edge indices, most important first: by ``|score|``, or (``absolute=False``) by ``-score``."""
    key = scores.abs() if absolute else -scores
    return torch.argsort(key.float(), descending=True, stable=True)


def top_edges(graph: Graph, scores: Tensor, n: int, absolute: bool = True, prune: bool = True) -> Tensor:
    """Bool mask of the ``n`` best edges (then, with ``prune``, only those on an input-to-logits path)."""
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    keep[ranking(scores, absolute)[:max(0, int(n))]] = True
    return prune_dangling(graph, keep) if prune else keep


def area(x, y) -> float:
    """Trapezoidal area under ``y(x)``."""
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-``k`` circuits: ``fractions`` of the graph's edges, ``n_edges`` kept after
    pruning, ``faithfulness``; ``cpr`` and ``cmd`` as in MIB (module docstring)."""

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    absolute: bool = True

    @property
    def cpr(self) -> float:
        return area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        return area(self.fractions, [abs(1 - f) for f in self.faithfulness])

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"fraction": self.fractions, "n_edges": self.n_edges, "faithfulness": self.faithfulness})

    def plot(self, title: str = "faithfulness over circuit size"):
        """Faithfulness against the fraction of edges kept (log scale), with CPR and CMD in the title."""
        from mm_lens.viz.common import MIN_FONT, figure

        fig = figure(4.8, 3.2)
        ax = fig.subplots()
        ax.plot(self.fractions, self.faithfulness, marker="o", color="#d62728")
        ax.axhline(1.0, color="#555", lw=0.8, ls="--")
        ax.axhline(0.0, color="#999", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of edges kept (top by |score|)" if self.absolute else
                      "fraction of edges kept (top by -score)")
        ax.set_ylabel("faithfulness (1 = full model, 0 = all edges patched)")
        ax.set_title(f"{title}\nCPR {self.cpr:.3f} (higher is better), CMD {self.cmd:.3f} (lower is better)",
                     fontsize=MIN_FONT + 1)
        return fig


def faithfulness_curve(runs: Runs, scores: Tensor, fractions=MIB_FRACTIONS, absolute: bool = True,
                       progress: bool = False) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits for every fraction (module docstring): one exact run each."""
    graph = runs.graph
    sizes, values = [], []
    for fraction in tqdm(fractions, desc="faithfulness curve", disable=not progress):
        keep = top_edges(graph, scores, int(fraction * graph.n_edges), absolute)
        sizes.append(int(keep.sum()))
        values.append(runs.faithfulness(keep))
    return FaithfulnessCurve(list(fractions), sizes, values, absolute)


def smallest_faithful(runs: Runs, scores: Tensor, target: float, absolute: bool = True, progress: bool = False
                ) -> tuple[Tensor, float]:
    """The smallest top-k circuit (pruned) whose faithfulness reaches ``target``: k doubles from 1 until it
    does, then bisection. Returns the mask and its faithfulness."""
    graph = runs.graph
    memo: dict = {}

    def faith(n: int) -> tuple[Tensor, float]:
        if n not in memo:
            keep = top_edges(graph, scores, n, absolute)
            memo[n] = (keep, runs.faithfulness(keep))
        return memo[n]

    bar = tqdm(desc="circuit size", disable=not progress)
    lo, hi = 0, 1
    while hi < graph.n_edges and faith(hi)[1] < target:
        lo, hi = hi, min(2 * hi, graph.n_edges)
        bar.update(1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if faith(mid)[1] >= target:
            hi = mid
        else:
            lo = mid
        bar.update(1)
    bar.close()
    return faith(hi)
