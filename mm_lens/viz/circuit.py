"""An interactive circuit diagram: position groups as lanes, components by layer, weighted edges.

Each lane is a position group (an image region, drawn with its thumbnail cut from the input image as
the model sees it; the question with its words; the last position). Within a lane, components sit by
layer: the input (embedding / image features) on the left, heads (``L2H3``) and MLPs (``mlp2``) per
layer, DeepStack's vision features (``visual_in2``, Qwen3-VL, added after block 2) just after their layer's
MLP in the image lanes, the logits on the right. Edges run from sender to receiver: along a lane for query and MLP
inputs, across lanes for keys and values (what a head moves from one group to another). Colour is
the sign (red: patching the edge lowers the metric, the edge carries the answer; blue: the opposite),
width the size; line style the receiver input (``v`` solid, ``k`` dashed, ``q`` dotted). A slider
hides edges below a threshold (and nodes left without edges); hovering shows an edge's score, a
node's edges and, for image nodes, where on the image the region is.

The figure is self-contained HTML + SVG + a little JavaScript (images inlined, nothing fetched): it
renders in Jupyter and Colab through ``_repr_html_`` and saves with ``.save("circuit.html")``.
``circuit_diagram`` also draws a plain ``{(sender, receiver): weight}`` mapping or path-patching
results (one lane).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from mm_lens.analysis.results import PatchResult

_HEAD = re.compile(r"^L(\d+)H(\d+)")
_LAYERED = re.compile(r"^(attn|mlp|visual_in|resid_pre|resid_mid|resid_post)(\d+)$")
COLORS = {"input": "#7f7f7f", "head": "#1f77b4", "attn": "#1f77b4", "mlp": "#2ca02c", "resid": "#9467bd",
          "visual_in": "#ff7f0e", "logits": "#d62728"}
POSITIVE, NEGATIVE = "#d62728", "#1f77b4"  # carries the answer / works against it
DASH = {"q": "2,3", "k": "6,3", "v": "", "mlp": "", "logits": "", "": ""}
SLOT_WORDS = {"q": "query", "k": "key", "v": "value", "mlp": "MLP input", "logits": "logits"}


def node_column(name: str, n_layers: int) -> tuple[float, str]:
    """Where a component goes (x in layer units) and its kind; ``"L2H3@last"`` reads its component."""
    base = name.split("@")[0].split(".")[0]
    m = _HEAD.match(base)
    if m:
        return int(m.group(1)) + 0.35, "head"
    m = _LAYERED.match(base)
    if m:
        kind, layer = m.group(1), int(m.group(2))
        offset = {"attn": 0.35, "mlp": 0.7, "visual_in": 0.85, "resid_pre": 0.0, "resid_mid": 0.5,
                  "resid_post": 0.95}[kind]
        return layer + offset, "resid" if kind.startswith("resid") else kind
    if base == "logits":
        return n_layers + 0.5, "logits"
    return -1.0, "input"


@dataclass
class Lane:
    """One position group: its name, what it shows (words, or a thumbnail of its image region) and, for
    image regions, the region on the image (``box`` in pixels of ``image``)."""

    name: str
    text: str = ""
    thumbnail: str = ""  # PNG, base64
    image: str = ""  # the whole input image, PNG base64 (image lanes)
    box: Optional[tuple[int, int, int, int]] = None
    image_size: tuple[int, int] = (0, 0)
    where: str = ""


@dataclass
class CircuitDiagram:
    """Weighted edges ``(sender, receiver, weight)`` between ``component@lane`` nodes (a name without
    ``@`` is a component in the unnamed lane, or a lane's input if it is no component); ``to_html()`` draws
    them (module docstring)."""

    edges: list[tuple[str, str, float]]
    n_layers: int
    title: str = ""
    threshold: float = 0.0
    labels: dict = field(default_factory=dict)  # (sender, receiver) -> receiver input (q, k, v, ...)
    lanes: list[Lane] = field(default_factory=list)
    answer_sign: int = 1  # +1: a positive weight carries the answer (patching effects); -1: a negative one (EAP)
    width: int = 960

    @property
    def nodes(self) -> list[str]:
        seen: dict = {}
        for s, r, _ in self.edges:
            seen.setdefault(_node(s), None)
            seen.setdefault(_node(r), None)
        return list(seen)

    # ---------------------------------------------------------------- layout
    def _lanes(self) -> list[Lane]:
        used = {_lane_of(n) for n in self.nodes}
        known = [lane for lane in self.lanes if lane.name in used]
        names = {lane.name for lane in known}
        return known + [Lane(name) for name in dict.fromkeys(_lane_of(n) for n in self.nodes) if name not in names]

    def layout(self, width: int = 960) -> tuple[dict, list, int]:
        """``({node: (x, y, kind)}, [(lane, top, height)], total height)``."""
        left, right, top = 170, 40, 64
        xs = [node_column(n, self.n_layers)[0] for n in self.nodes]
        lo, hi = min(xs), max(xs)
        pos, bands, y = {}, [], top
        for lane in self._lanes():
            members = [n for n in self.nodes if _lane_of(n) == lane.name]
            columns: dict = {}
            for n in sorted(members):
                columns.setdefault(node_column(n, self.n_layers)[0], []).append(n)
            stack = max(len(v) for v in columns.values())
            height = max(78, 50 * stack + 30)
            for x, names in columns.items():
                px = left + (width - left - right) * ((x - lo) / (hi - lo) if hi > lo else 0.5)
                for i, n in enumerate(names):
                    pos[n] = (px, y + height * (i + 1) / (len(names) + 1), node_column(n, self.n_layers)[1])
            bands.append((lane, y, height))
            y += height
        return pos, bands, y + 20

    # ---------------------------------------------------------------- drawing
    def to_html(self, width: Optional[int] = None, height: Optional[int] = None) -> str:
        width = width or self.width
        uid = "circuit_" + uuid.uuid4().hex[:10]
        pos, bands, total = self.layout(width)
        total = max(total, height or 0)
        top = max((abs(w) for _, _, w in self.edges), default=1.0) or 1.0
        lanes = {lane.name: i for i, (lane, _, _) in enumerate(bands)}
        parts = [f'<svg id="{uid}_svg" width="{width}" height="{total}" style="font-family:sans-serif;font-size:11px;'
                 f'background:white">']
        parts += [_band(lane, y, h, width, i) for i, (lane, y, h) in enumerate(bands)]
        parts += _layer_ticks(self.n_layers, pos)
        for s, r, w in sorted(self.edges, key=lambda e: abs(e[2])):
            parts.append(self._edge(s, r, w, pos, top))
        for n, (x, y, kind) in pos.items():
            parts.append(_node_svg(n, x, y, kind, bands[lanes[_lane_of(n)]][0], lanes[_lane_of(n)]))
        parts += [_locator(lane, i, width) for i, (lane, _, _) in enumerate(bands) if lane.image]
        parts.append("</svg>")
        slider = (f'<div style="font-family:sans-serif;font-size:12px;margin-bottom:4px"><b>{html.escape(self.title)}'
                  f'</b><br>|score| &ge; <input id="{uid}_t" type="range" min="0" max="{top:.6g}" step="{top / 200:.6g}" '
                  f'value="{self.threshold:.6g}"> <span id="{uid}_v">{self.threshold:.3g}</span> &nbsp; '
                  f'<span id="{uid}_n"></span> &nbsp; <span style="color:{POSITIVE}">&#9632; carries the answer '
                  f'({self._meaning(self.answer_sign)})</span> <span style="color:{NEGATIVE}">'
                  f'&#9632; works against it</span> &nbsp; line: value solid, key dashed, query dotted</div>')
        script = _SCRIPT.replace("UID", json.dumps(uid))
        return f'<div id="{uid}" class="mm-circuit">{slider}{"".join(parts)}<script>{script}</script></div>'

    def _edge(self, s: str, r: str, w: float, pos: dict, top: float) -> str:
        (x1, y1, _), (x2, y2, _) = pos[_node(s)], pos[_node(r)]
        slot = self.labels.get((s, r)) or (r.rsplit(".", 1)[1] if re.search(r"\.[qkv]$", r) else "")
        colour = POSITIVE if w * self.answer_sign > 0 else NEGATIVE
        meaning = self._meaning(w)
        via = f" ({SLOT_WORDS.get(slot, slot)})" if slot else ""
        tip = html.escape(f"{_node(s)} -> {_node(r)}{via}: score {w:+.4g} ({meaning})")
        bend = 0.45 * (x2 - x1)
        dash = f' stroke-dasharray="{DASH.get(slot, "")}"' if DASH.get(slot) else ""
        return (f'<path class="edge" data-s="{html.escape(_node(s))}" data-r="{html.escape(_node(r))}" '
                f'data-w="{abs(w):.6g}" d="M{x1 + 12:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f} '
                f'{x2 - 12:.1f},{y2:.1f}" stroke="{colour}" stroke-opacity="0.8" fill="none"{dash} '
                f'stroke-width="{0.8 + 7 * abs(w) / top:.2f}"><title>{tip}</title></path>')

    def _meaning(self, w: float) -> str:
        if self.answer_sign < 0:  # an estimate of patching the edge (EAP)
            return "patching it lowers the metric" if w < 0 else "patching it raises the metric"
        return "restoring it raises the metric" if w > 0 else "restoring it lowers the metric"

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str) -> None:
        """A self-contained HTML page with the diagram."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title></head>"
                    f"<body>{self.to_html()}</body></html>")


def _node(name: str) -> str:
    """``"L1H0@last.q"`` -> ``"L1H0@last"``, ``"L1H0.q"`` -> ``"L1H0"``; a group name alone -> that lane's input."""
    name = re.sub(r"\.[qkv]$", "", name)
    component, at, lane = name.partition("@")
    component = component.split(".")[0]
    if not at and node_column(component, 1)[1] == "input" and component != "input":
        return f"input@{component}"
    return f"{component}@{lane}" if at else component


def _lane_of(node: str) -> str:
    return node.partition("@")[2]


def _band(lane: Lane, y: float, h: float, width: int, i: int) -> str:
    fill = "#f7f7f7" if i % 2 == 0 else "#ffffff"
    out = [f'<rect class="lane" x="0" y="{y:.1f}" width="{width}" height="{h:.1f}" fill="{fill}"/>']
    label = lane.name or "all positions"
    out.append(f'<text x="8" y="{y + 16:.1f}" font-weight="bold">{html.escape(label)}</text>')
    if lane.thumbnail:
        size = min(h - 26, 56)
        out.append(f'<image class="thumb" x="8" y="{y + 22:.1f}" width="{size:.0f}" height="{size:.0f}" '
                   f'preserveAspectRatio="xMidYMid meet" style="image-rendering:pixelated" '
                   f'href="data:image/png;base64,{lane.thumbnail}"><title>{html.escape(lane.where)}</title></image>')
    if lane.text:
        words = lane.text if len(lane.text) <= 26 else lane.text[:25] + "…"
        tx = 72 if lane.thumbnail else 8
        out.append(f'<text x="{tx}" y="{y + 34:.1f}" fill="#444">{html.escape(words)}</text>')
    return "".join(out)


def _layer_ticks(n_layers: int, pos: dict) -> list[str]:
    if not pos:
        return []
    xs = {}
    for n, (x, _, kind) in pos.items():
        layer = node_column(n, n_layers)[0]
        name = "input" if kind == "input" else ("logits" if kind == "logits" else f"layer {int(layer)}")
        xs.setdefault(name, []).append(x)
    return [f'<text x="{sum(v) / len(v):.1f}" y="40" text-anchor="middle" fill="#555">{html.escape(k)}</text>'
            for k, v in xs.items()]


def _node_svg(n: str, x: float, y: float, kind: str, lane: Lane, lane_index: int) -> str:
    component = n.partition("@")[0]
    where = f" — {lane.where}" if lane.where else ""
    tip = html.escape(f"{n} ({kind}){where}")
    loc = f' data-loc="{lane_index}"' if lane.image else ""
    if kind == "input" and lane.thumbnail:
        shape = (f'<rect x="{x - 13:.1f}" y="{y - 13:.1f}" width="26" height="26" fill="white" stroke="#333"/>'
                 f'<image x="{x - 12:.1f}" y="{y - 12:.1f}" width="24" height="24" style="image-rendering:pixelated" '
                 f'href="data:image/png;base64,{lane.thumbnail}"/>')
    else:
        shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="12" fill="{COLORS[kind]}" fill-opacity="0.85" '
                 f'stroke="#333"/>')
    return (f'<g class="node" data-n="{html.escape(n)}"{loc} style="cursor:pointer">{shape}'
            f'<text x="{x:.1f}" y="{y + 25:.1f}" text-anchor="middle">{html.escape(component)}</text>'
            f'<title>{tip}</title></g>')


def _locator(lane: Lane, i: int, width: int) -> str:
    """The whole image with the lane's region outlined, shown while an image node is hovered."""
    w, h = lane.image_size
    scale = 120 / max(w, h, 1)
    x0, y0, x1, y1 = lane.box
    return (f'<g class="locator" data-loc="{i}" style="display:none" transform="translate({width - 140},70)">'
            f'<rect x="-4" y="-4" width="{w * scale + 8:.0f}" height="{h * scale + 24:.0f}" fill="white" stroke="#999"/>'
            f'<image width="{w * scale:.0f}" height="{h * scale:.0f}" style="image-rendering:pixelated" '
            f'href="data:image/png;base64,{lane.image}"/>'
            f'<rect x="{x0 * scale:.1f}" y="{y0 * scale:.1f}" width="{(x1 - x0) * scale:.1f}" '
            f'height="{(y1 - y0) * scale:.1f}" fill="none" stroke="#d62728" stroke-width="2.5"/>'
            f'<text y="{h * scale + 14:.0f}">{html.escape(lane.where)}</text></g>')


_SCRIPT = """
(function(){
  var uid = UID, root = document.getElementById(uid);
  if (!root) return;
  var edges = root.querySelectorAll('.edge'), nodes = root.querySelectorAll('.node');
  var slider = document.getElementById(uid + '_t'), shown = document.getElementById(uid + '_v');
  var count = document.getElementById(uid + '_n');
  function filter(){
    var t = parseFloat(slider.value), on = {}, ne = 0, nn = 0;
    shown.textContent = t.toPrecision(3);
    edges.forEach(function(e){
      var vis = parseFloat(e.dataset.w) >= t;
      e.style.display = vis ? '' : 'none';
      if (vis) { on[e.dataset.s] = true; on[e.dataset.r] = true; ne++; }
    });
    nodes.forEach(function(n){ var vis = !!on[n.dataset.n]; n.style.display = vis ? '' : 'none'; if (vis) nn++; });
    count.textContent = ne + ' edges, ' + nn + ' nodes shown';
  }
  slider.addEventListener('input', filter); filter();
  nodes.forEach(function(n){
    var loc = n.dataset.loc === undefined ? null : root.querySelector('.locator[data-loc="' + n.dataset.loc + '"]');
    n.addEventListener('mouseenter', function(){
      edges.forEach(function(e){
        var hit = e.dataset.s === n.dataset.n || e.dataset.r === n.dataset.n;
        e.setAttribute('stroke-opacity', hit ? '1' : '0.08');
      });
      if (loc) loc.style.display = '';
    });
    n.addEventListener('mouseleave', function(){
      edges.forEach(function(e){ e.setAttribute('stroke-opacity', '0.8'); });
      if (loc) loc.style.display = 'none';
    });
  });
})();
"""


# ---------------------------------------------------------------- from circuits and path patching
def _png(image, size: Optional[int] = None) -> str:
    if size is not None:
        from PIL import Image

        image = image.resize((size, size), Image.NEAREST) if max(image.size) < size else image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def circuit_lanes(circuit) -> list[Lane]:
    """A lane per position group of a :class:`~mm_lens.circuits.circuit.Circuit`, with thumbnails of image regions."""
    lanes = []
    image, (rows, cols) = circuit.image, circuit.grid_shape
    full = _png(image) if image is not None else ""
    for g in circuit.groups:
        text = " ".join(t.strip() for t in g.tokens if not t.startswith("<img")) if g.kind != "image" else ""
        if not g.patches or image is None:
            lanes.append(Lane(g.name, text=text))
            continue
        pw, ph = image.width / cols, image.height / rows
        r0, r1 = min(r for r, _ in g.patches), max(r for r, _ in g.patches) + 1
        c0, c1 = min(c for _, c in g.patches), max(c for _, c in g.patches) + 1
        box = (round(c0 * pw), round(r0 * ph), round(c1 * pw), round(r1 * ph))
        crop = image.crop(box)
        where = (f"{len(g.patches)} patch(es), rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}: pixels x {box[0]}-{box[2]}, "
                 f"y {box[1]}-{box[3]} of the {image.width}x{image.height} input")
        lanes.append(Lane(g.name, text=text, thumbnail=_png(crop, 48), image=full, box=box, image_size=image.size,
                          where=where))
    return lanes


def diagram_of_circuit(circuit, title: Optional[str] = None, threshold: float = 0.0, width: int = 960) -> CircuitDiagram:
    """The lane diagram of a :class:`~mm_lens.circuits.circuit.Circuit`."""
    if not circuit.edges:
        raise ValueError("the circuit has no edges to draw")
    edges = [(e.sender, e.receiver + (f".{e.slot}" if e.slot in ("q", "k", "v") else ""),
              e.score if e.score == e.score else -1.0) for e in circuit.edges]
    if title is None:
        title = (f"{circuit.method or 'circuit'}: {len(circuit.edges)} of {circuit.n_graph_edges} edges, faithfulness "
                 f"{circuit.faithfulness:.2f} (exact patching)")
    return CircuitDiagram(edges, circuit.n_layers, title, threshold, {}, circuit_lanes(circuit), -1, width)


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


def circuit_diagram(edges, n_layers: Optional[int] = None, title: str = "", threshold: float = 0.0,
                    top_k: Optional[int] = None) -> CircuitDiagram:
    """The diagram of a :class:`~mm_lens.circuits.circuit.Circuit`, of ``{(sender, receiver): weight}``, or of
    path-patching results. ``top_k`` keeps the strongest edges; ``threshold`` is the slider's starting value."""
    from mm_lens.circuits.circuit import Circuit

    if isinstance(edges, Circuit):
        return diagram_of_circuit(edges, title or None, threshold)
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

