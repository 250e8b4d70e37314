"""A circuit: scored edges between (component x position group) nodes, with its faithfulness.

``Circuit`` is what :func:`~mm_lens.circuits.discovery.discover` returns; it exports JSON
(:meth:`Circuit.to_json`, :meth:`Circuit.from_json`), a networkx ``MultiDiGraph`` (:meth:`Circuit.to_networkx`,
if networkx is installed) and a DataFrame, and draws itself (:meth:`Circuit.diagram`; in Jupyter and
Colab the circuit is shown as its diagram).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from mm_lens.circuits.faithfulness import FaithfulnessCurve
from mm_lens.circuits.graph import Edge, component_layer, node_parts
from mm_lens.circuits.groups import GroupInfo


@dataclass
class Circuit:
    """``edges`` (with scores, most important first), the faithfulness of the circuit as verified by exact
    patching, and what the diagram needs (the position groups, the input image as the model sees it)."""

    edges: list[Edge]
    faithfulness: float
    metric_full: float
    metric_empty: float
    metric_circuit: float
    groups: list[GroupInfo]
    n_layers: int
    n_heads: int
    n_graph_edges: int
    method: str = ""
    ablation: str = "patch"
    curve: Optional[FaithfulnessCurve] = None
    image: object = field(default=None, repr=False)  # PIL image (as the model sees it) for the diagram
    grid_shape: tuple = (0, 0)
    notes: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- views
    @property
    def nodes(self) -> list[str]:
        """Every node an edge touches, by layer then name."""
        names = {n for e in self.edges for n in (e.sender, e.receiver)}
        return sorted(names, key=lambda n: (component_layer(node_parts(n)[0], self.n_layers), n))

    @property
    def edge_names(self) -> list[str]:
        return [e.name for e in self.edges]

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge) -> bool:
        return (edge.name if isinstance(edge, Edge) else edge) in set(self.edge_names)

    def to_frame(self):
        """One row per edge: sender, receiver, slot, score, edge name."""
        import pandas as pd

        return pd.DataFrame([dict(edge=e.name, sender=e.sender, receiver=e.receiver, slot=e.slot, score=e.score)
                             for e in self.edges])

    def __repr__(self) -> str:
        return (f"Circuit({len(self.edges)} of {self.n_graph_edges} edges, {len(self.nodes)} nodes, faithfulness "
                f"{self.faithfulness:.3f}, method {self.method!r}, groups {[g.name for g in self.groups]})")

    # ---------------------------------------------------------------- exports
    def to_dict(self) -> dict:
        out = dict(edges=[dict(name=e.name, sender=e.sender, receiver=e.receiver, slot=e.slot, score=e.score)
                          for e in self.edges],
                   nodes=self.nodes, faithfulness=self.faithfulness, metric_full=self.metric_full,
                   metric_empty=self.metric_empty, metric_circuit=self.metric_circuit,
                   groups=[asdict(g) for g in self.groups], n_layers=self.n_layers, n_heads=self.n_heads,
                   n_graph_edges=self.n_graph_edges, method=self.method, ablation=self.ablation,
                   grid_shape=list(self.grid_shape), notes=self.notes,
                   curve=None if self.curve is None else asdict(self.curve))
        if self.image is not None:
            buf = io.BytesIO()
            self.image.save(buf, format="PNG")
            out["image_png"] = base64.b64encode(buf.getvalue()).decode()
        return out

    def to_json(self, path=None, indent: int = 1) -> str:
        """The circuit as JSON (written to ``path`` when given); :meth:`from_json` reads it back."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "Circuit":
        """A circuit from :meth:`to_json`'s text or a file holding it."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        d = json.loads(text)
        image = None
        if d.get("image_png"):
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(d["image_png"])))
            image.load()
        curve = FaithfulnessCurve(**d["curve"]) if d.get("curve") else None
        return cls([Edge(e["sender"], e["receiver"], e["slot"], e["score"]) for e in d["edges"]], d["faithfulness"],
                    d["metric_full"], d["metric_empty"], d["metric_circuit"],
                    [GroupInfo(g["name"], g["positions"], g["tokens"], [tuple(p) for p in g["patches"]])
                     for g in d["groups"]], d["n_layers"], d["n_heads"], d["n_graph_edges"], d["method"],
                    d["ablation"], curve, image, tuple(d["grid_shape"]), d.get("notes", {}))

    def to_networkx(self):
        """A ``networkx.MultiDiGraph``: nodes with ``component``, ``group``, ``layer``; edges keyed by slot with
        ``score``."""
        try:
            import networkx as nx
        except ImportError:
            raise ImportError("Circuit.to_networkx needs networkx: pip install networkx") from None
        g = nx.MultiDiGraph(faithfulness=self.faithfulness, method=self.method)
        for n in self.nodes:
            component, group = node_parts(n)
            g.add_node(n, component=component, group=group, layer=component_layer(component, self.n_layers))
        for e in self.edges:
            g.add_edge(e.sender, e.receiver, key=e.slot, slot=e.slot, score=e.score)
        return g

    # ---------------------------------------------------------------- drawing
    def diagram(self, title: Optional[str] = None, threshold: float = 0.0, width: int = 960):
        """The interactive diagram (:class:`~mm_lens.viz.circuit.CircuitDiagram`)."""
        from mm_lens.viz.circuit import diagram_of_circuit

        return diagram_of_circuit(self, title=title, threshold=threshold, width=width)

    def _repr_html_(self) -> str:
        return self.diagram()._repr_html_()
