"""Circuits across image and text: a position-aware graph of (component x position group) nodes, edge
attribution (EAP, EAP-IG), exact verification and faithfulness (MIB's measures), ACDC-style pruning, the
interactive diagram, and a ground-truth suite that scores every localisation method of the library.

    from mm_lens.circuits import discover
    circuit = discover(model, clean, corrupted, metric, method="eap-ig")
    circuit                 # the diagram, in Jupyter / Colab
    circuit.to_json("circuit.json"); circuit.to_networkx()

Names are imported on first use, so ``import mm_lens.circuits`` (and ``mm-lens --help``) stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "discover": "mm_lens.circuits.discovery", "verify": "mm_lens.circuits.discovery",
    "Circuit": "mm_lens.circuits.circuit", "Edge": "mm_lens.circuits.graph", "Graph": "mm_lens.circuits.graph",
    "position_groups": "mm_lens.circuits.groups", "prepare": "mm_lens.circuits.runs",
    "edge_attribution": "mm_lens.circuits.attribution", "faithfulness_curve": "mm_lens.circuits.faithfulness",
    "FaithfulnessCurve": "mm_lens.circuits.faithfulness", "top_edges": "mm_lens.circuits.faithfulness",
    "acdc_prune": "mm_lens.circuits.pruning",
    "groundtruth": "mm_lens.circuits.groundtruth",
}
__all__ = ["discover", "verify", "Circuit", "Edge", "Graph", "position_groups", "prepare", "edge_attribution",
           "faithfulness_curve", "FaithfulnessCurve", "top_edges", "acdc_prune", "groundtruth"]

if TYPE_CHECKING:
    from mm_lens.circuits import groundtruth
    from mm_lens.circuits.attribution import edge_attribution
    from mm_lens.circuits.circuit import Circuit
    from mm_lens.circuits.discovery import discover, verify
    from mm_lens.circuits.faithfulness import FaithfulnessCurve, faithfulness_curve, top_edges
    from mm_lens.circuits.graph import Edge, Graph
    from mm_lens.circuits.groups import position_groups
    from mm_lens.circuits.pruning import acdc_prune
    from mm_lens.circuits.runs import prepare


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mm_lens.circuits' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    value = module if name == "groundtruth" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
