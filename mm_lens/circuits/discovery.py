"""``discover``: find a circuit across image and text positions, and verify it by exact patching.

1. Score every edge of the position-aware graph (:mod:`mm_lens.circuits.graph`) with EAP or EAP-IG
   (:mod:`mm_lens.circuits.attribution`), averaged over the batch.
2. Choose the circuit: the top ``n_edges`` by score, or (default) the smallest top-k circuit whose
   exact faithfulness reaches ``target``; edges off every input-to-logits path are dropped.
3. Optionally prune it greedily, ACDC-style (``prune="acdc"``, :mod:`mm_lens.circuits.pruning`).
4. Verify: faithfulness of the final circuit by exact edge patching, and MIB's faithfulness curve
   (:mod:`mm_lens.circuits.faithfulness`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.circuit import Circuit
from mm_lens.circuits.faithfulness import faithfulness_curve, smallest_faithful, top_edges
from mm_lens.circuits.graph import Edge
from mm_lens.circuits.groups import PositionsSpec
from mm_lens.circuits.pruning import acdc_prune
from mm_lens.circuits.runs import Runs, prepare
from mm_lens.inputs import MultimodalInput


def discover(
    model,
    clean: MultimodalInput,
    corrupted: MultimodalInput,
    metric: Callable,
    method: str = "eap-ig",
    positions: PositionsSpec = None,
    *,
    patches: bool = False,
    steps: int = 5,
    n_edges: Optional[int] = None,
    target: float = 0.9,
    prune: Optional[str] = None,
    tau: float = 0.02,
    absolute: bool = True,
    ablation: str = "patch",
    clean_hooks=None,
    corrupted_hooks=None,
    curve: bool = True,
    progress: bool = True,
) -> Circuit:
    """A circuit for ``metric(logits)`` (``logits [batch, 1, vocab]`` at each row's last position; a scalar
    or a ``[batch]`` value) between the clean and the corrupted input (module docstring).

    ``positions``: the position groups (names, Groups, ``(name, group)`` pairs or a ``{name: group}``
    dict; default ``last``, ``object``/``non_object`` or ``image``, ``question``, and ``other`` for the
    rest); ``patches=True`` makes every remaining image patch its own group. ``method``: ``"eap-ig"``
    (``steps`` interpolation steps) or ``"eap"``. ``ablation``: ``"patch"`` (edges outside the circuit
    take the corrupted run's values) or ``"mean"`` (the mean over the corrupted batch).
    """
    if prune not in (None, "acdc"):
        raise ValueError(f"prune must be None or 'acdc', got {prune!r}")
    runs = prepare(model, clean, corrupted, metric, positions, patches, ablation, clean_hooks, corrupted_hooks)
    _check_corruption(runs)
    scores = edge_attribution(runs, method, steps, progress)
    if n_edges is not None:
        keep = top_edges(runs.graph, scores, n_edges, absolute)
    else:
        keep, _ = smallest_faithful(runs, scores, target, absolute, progress)
    if prune == "acdc":
        keep = acdc_prune(runs, keep, scores, tau, progress)
    return build_circuit(runs, keep, scores, method, faithfulness_curve(runs, scores, absolute=absolute,
                                                                        progress=progress) if curve else None)


def _check_corruption(runs: Runs) -> None:
    full, empty = float(runs.clean_metric.mean()), float(runs.empty_metric.mean())
    if abs(full - empty) < max(1e-2, 5e-2 * abs(full)):
        raise ValueError(f"the corruption barely changes the metric (clean {full:.4g}, every edge patched {empty:.4g}): "
                         "there is no circuit to find. Use a stronger corruption (check it first: the metric on the "
                         "corrupted input should be far from the clean one)")


@torch.no_grad()
def build_circuit(runs: Runs, keep: torch.Tensor, scores: torch.Tensor, method: str = "", curve=None) -> Circuit:
    """The :class:`Circuit` of the edges ``keep`` (verified by exact patching) with their ``scores``."""
    graph = runs.graph
    value = runs.evaluate(keep)
    order = sorted(keep.nonzero().flatten().tolist(), key=lambda i: -abs(float(scores[i])))
    edges = [Edge(graph.edges[i].sender, graph.edges[i].receiver, graph.edges[i].slot, float(scores[i]))
             for i in order]
    image, grid = None, (0, 0)
    if runs.clean.pixel_values is not None:
        from mm_lens.viz.tracing import input_image

        image, grid = input_image(runs.model, runs.clean), tuple(runs.clean.positions[0].grid_shape)
    circuit = Circuit(edges, runs.faithfulness(keep, value), float(runs.clean_metric.mean()),
                      float(runs.empty_metric.mean()), float(value.mean()), graph.groups.info, graph.n_layers,
                      graph.n_heads, graph.n_edges, method, runs.ablation, curve, image, grid)
    circuit._runs = runs
    circuit._scores = scores
    return circuit


def verify(model, clean: MultimodalInput, corrupted: MultimodalInput, metric: Callable, edges: Sequence,
           positions: PositionsSpec = None, *, patches: bool = False, ablation: str = "patch", clean_hooks=None,
           corrupted_hooks=None) -> Circuit:
    """Exact verification of a circuit you name (edge names or :class:`Edge` s, e.g. another circuit's
    ``edges``): its faithfulness when every other edge is patched. Scores are left NaN."""
    runs = prepare(model, clean, corrupted, metric, positions, patches, ablation, clean_hooks, corrupted_hooks)
    keep = runs.graph.mask_of(edges)
    return build_circuit(runs, keep, torch.full((runs.graph.n_edges,), float("nan")), "given")
