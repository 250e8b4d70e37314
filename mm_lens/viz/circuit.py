"""An interactive circuit diagram: components as nodes, effects as weighted edges.

Nodes: position groups (``"image"``, ``"question"``, ...) on the left, heads (``"L2H3"``),
attention layers (``"attn2"``) and MLPs (``"mlp2"``) by layer, ``"logits"`` on the right.
Edges: ``{(sender, receiver): weight}``, e.g. path-patching effects
(:func:`edges_from_path_patching`). The figure is self-contained HTML + SVG + a little
JavaScript (hover a node to highlight its edges, a slider hides weak edges); it renders in
Jupyter and Colab through ``_repr_html_`` and saves with ``.save("circuit.html")``.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from mm_lens.analysis.results import PatchResult

_HEAD = re.compile(r"^L(\d+)H(\d+)")
_LAYERED = re.compile(r"^(attn|mlp|resid_pre|resid_mid|resid_post)(\d+)$")
COLORS = {"input": "#7f7f7f", "head": "#1f77b4", "attn": "#1f77b4", "mlp": "#2ca02c", "resid": "#9467bd",
          "logits": "#d62728"}


def node_column(name: str, n_layers: int) -> tuple[float, str]:
    """Where a node goes (x in layer units) and its kind."""
    base = name.split(".")[0]
    m = _HEAD.match(base)
    if m:
        return int(m.group(1)) + 0.35, "head"
    m = _LAYERED.match(base)
    if m:
        kind, layer = m.group(1), int(m.group(2))
        offset = {"attn": 0.35, "mlp": 0.7, "resid_pre": 0.0, "resid_mid": 0.5, "resid_post": 0.95}[kind]
        return layer + offset, "resid" if kind.startswith("resid") else kind
    if base == "logits":
        return n_layers + 0.5, "logits"
    return -1.0, "input"


@dataclass
class CircuitDiagram:
    """Nodes and weighted edges; ``to_html()`` draws them."""

    edges: list[tuple[str, str, float]]
    n_layers: int
    title: str = ""
    threshold: float = 0.0
    labels: dict = field(default_factory=dict)  # (sender, receiver) -> edge label

    @property
    def nodes(self) -> list[str]:
        seen = {}
        for s, r, _ in self.edges:
            seen.setdefault(s.split(".")[0], None)
            seen.setdefault(r.split(".")[0], None)
        return list(seen)

    def layout(self, width: int = 900, height: int = 420) -> dict[str, tuple[float, float, str]]:
        cols: dict[float, list[str]] = {}
        kinds = {}
        for n in self.nodes:
            x, kind = node_column(n, self.n_layers)
            cols.setdefault(x, []).append(n)
            kinds[n] = kind
        xs = sorted(cols)
        lo, hi = min(xs), max(xs)
        pos = {}
        for x, names in cols.items():
            px = 70 + (width - 140) * ((x - lo) / (hi - lo) if hi > lo else 0.5)
            for i, n in enumerate(sorted(names)):
                py = 50 + (height - 90) * ((i + 1) / (len(names) + 1))
                pos[n] = (px, py, kinds[n])
        return pos

    def to_html(self, width: int = 900, height: int = 420) -> str:
        uid = "circuit_" + uuid.uuid4().hex[:10]
        pos = self.layout(width, height)
        top = max((abs(w) for _, _, w in self.edges), default=1.0) or 1.0
        parts = [f'<svg id="{uid}_svg" width="{width}" height="{height}" '
                 f'style="font-family:sans-serif;font-size:11px;background:white">']
        for s, r, w in sorted(self.edges, key=lambda e: abs(e[2])):
            (x1, y1, _), (x2, y2, _) = pos[s.split(".")[0]], pos[r.split(".")[0]]
            colour = "#d62728" if w > 0 else "#1f77b4"
            label = self.labels.get((s, r), "")
            tip = html.escape(f"{s} -> {r}{(' ' + label) if label else ''}: {w:+.4g}")
            bend = 0.25 * (x2 - x1)
            parts.append(
                f'<path class="edge" data-s="{html.escape(s.split(".")[0])}" data-r="{html.escape(r.split(".")[0])}" '
                f'data-w="{abs(w):.6g}" d="M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f} '
                f'{x2:.1f},{y2:.1f}" stroke="{colour}" stroke-opacity="0.75" fill="none" '
                f'stroke-width="{0.5 + 7 * abs(w) / top:.2f}"><title>{tip}</title></path>')
        for n, (x, y, kind) in pos.items():
            parts.append(
                f'<g class="node" data-n="{html.escape(n)}" style="cursor:pointer">'
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="13" fill="{COLORS[kind]}" fill-opacity="0.85" stroke="#333"/>'
                f'<text x="{x:.1f}" y="{y + 26:.1f}" text-anchor="middle">{html.escape(n)}</text>'
                f'<title>{html.escape(n)} ({kind})</title></g>')
        parts.append("</svg>")
        slider = (f'<div style="font-family:sans-serif;font-size:12px">{html.escape(self.title)} &nbsp; '
                  f'|effect| &ge; <input id="{uid}_t" type="range" min="0" max="{top:.6g}" step="{top / 100:.6g}" '
                  f'value="{self.threshold:.6g}"> <span id="{uid}_v">{self.threshold:.3g}</span> '
                  f'<span style="color:#d62728">&#9632; positive</span> '
                  f'<span style="color:#1f77b4">&#9632; negative</span></div>')
        script = _SCRIPT.replace("UID", json.dumps(uid))
        return f'<div id="{uid}">{slider}{"".join(parts)}<script>{script}</script></div>'

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{self.to_html()}</body></html>")


_SCRIPT = """
(function(){
  var uid = UID, root = document.getElementById(uid);
  if (!root) return;
  var edges = root.querySelectorAll('.edge'), nodes = root.querySelectorAll('.node');
  var slider = document.getElementById(uid + '_t'), shown = document.getElementById(uid + '_v');
  function filter(){
    var t = parseFloat(slider.value); shown.textContent = t.toPrecision(3);
    edges.forEach(function(e){ e.style.display = parseFloat(e.dataset.w) >= t ? '' : 'none'; });
  }
  slider.addEventListener('input', filter); filter();
  nodes.forEach(function(n){
    n.addEventListener('mouseenter', function(){
      edges.forEach(function(e){
        var on = e.dataset.s === n.dataset.n || e.dataset.r === n.dataset.n;
        e.setAttribute('stroke-opacity', on ? '1' : '0.08');
      });
    });
    n.addEventListener('mouseleave', function(){
      edges.forEach(function(e){ e.setAttribute('stroke-opacity', '0.75'); });
    });
  });
})();
"""


def edges_from_path_patching(results: Union[PatchResult, Sequence[PatchResult]], min_abs: float = 0.0
                             ) -> tuple[dict, dict]:
    """``({(sender, receiver): value - baseline}, labels)`` from :func:`~mm_lens.analysis.path_patching.path_patch`
    results (the receivers of each result jointly; ``.q/.k/.v`` kept as edge labels)."""
    results = [results] if isinstance(results, PatchResult) else list(results)
    edges, labels = {}, {}
    for r in results:
        if r.axes != ("sender",):
            raise ValueError(f"need path_patch results (axes ('sender',)), got {r.axes}")
        receivers = r.meta.get("receivers", ["logits"])
        base = float(r.baseline.mean()) if r.baseline is not None else 0.0
        receiver = receivers[0].split(".")[0] if len({x.split(".")[0] for x in receivers}) == 1 else "+".join(receivers)
        for s, v in zip(r.label("sender"), r.values.tolist()):
            w = v - base
            if abs(w) >= min_abs and abs(w) > 0:
                edges[(s, receiver)] = edges.get((s, receiver), 0.0) + w
                labels[(s, receiver)] = ",".join(x.split(".", 1)[1] for x in receivers if "." in x)
    return edges, labels


def circuit_diagram(edges: Union[Mapping[tuple[str, str], float], PatchResult, Sequence[PatchResult]],
                    n_layers: Optional[int] = None, title: str = "", threshold: float = 0.0, top_k: Optional[int] = None
                    ) -> CircuitDiagram:
    """The diagram of ``edges`` (``{(sender, receiver): weight}`` or path-patching results).

    ``top_k`` keeps the strongest edges; ``threshold`` is the slider's starting value.
    """
    labels = {}
    if isinstance(edges, PatchResult) or (isinstance(edges, (list, tuple)) and edges and
                                          isinstance(edges[0], PatchResult)):
        edges, labels = edges_from_path_patching(edges)
    items = [(str(s), str(r), float(w)) for (s, r), w in dict(edges).items()]
    if not items:
        raise ValueError("no edges to draw: every effect is zero (or nothing was given)")
    if top_k is not None:
        items = sorted(items, key=lambda e: -abs(e[2]))[:top_k]
    if n_layers is None:
        layers = [int(m.group(1)) for s, r, _ in items for name in (s, r)
                  for m in [_HEAD.match(name) or re.match(r"^\D+(\d+)", name)] if m]
        n_layers = max(layers, default=0) + 1
    return CircuitDiagram(items, n_layers, title, threshold, labels)
