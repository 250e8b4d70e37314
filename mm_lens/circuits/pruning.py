"""ACDC-style greedy pruning (Conmy et al., "Towards Automated Circuit Discovery for Mechanistic
Interpretability", NeurIPS 2023) on top of attribution scores.

ACDC visits the receivers from the logits backwards and tries to remove each incoming edge; an edge
is removed for good when that moves the circuit's output away from the full model's by less than
``tau``. Here the candidates are a circuit's edges (e.g. the top edges by EAP-IG), each receiver's
edges are tried from the lowest ``|score|`` up, and the distance is the normalised metric distance
``|1 - faithfulness|`` (ACDC's task-metric variant; its default is the KL divergence). Every trial is
one exact run (:meth:`~mm_lens.circuits.runs.Runs.evaluate`); edges left off any input-to-logits path
are dropped at the end.
"""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.circuits.graph import component_layer, node_parts, prune_dangling
from mm_lens.circuits.runs import Runs


def acdc_prune(runs: Runs, keep: Tensor, scores: Tensor, tau: float = 0.02, progress: bool = False) -> Tensor:
    """The circuit ``keep`` (bool over the graph's edges) after greedy pruning with threshold ``tau``
    (in faithfulness units: an edge goes when removing it moves faithfulness by less than ``tau``)."""
    graph = runs.graph
    keep = keep.clone().bool()
    candidates = keep.nonzero().flatten().tolist()
    n_layers = graph.n_layers

    def order(i: int):
        edge = graph.edges[i]
        return (-component_layer(node_parts(edge.receiver)[0], n_layers), edge.receiver, float(scores[i].abs()))

    distance = abs(1 - runs.faithfulness(keep))
    for i in tqdm(sorted(candidates, key=order), desc="ACDC pruning", disable=not progress):
        keep[i] = False
        trial = abs(1 - runs.faithfulness(keep))
        if trial - distance < tau:
            distance = trial
        else:
            keep[i] = True
    return prune_dangling(graph, keep)
