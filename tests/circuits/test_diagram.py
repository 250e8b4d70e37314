"""The circuit diagram: what the HTML draws (lanes, thumbnails, colours by sign, line style by receiver input),
and, in headless Chromium, that a notebook cell's output shows the expected nodes and edges, the slider hides
the weak ones and hovering an image node shows where the region is."""

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile

import pytest

from mm_lens.circuits import discover
from mm_lens.circuits.groundtruth import load
from mm_lens.viz import circuit_diagram
from mm_lens.viz.circuit import NEGATIVE, POSITIVE

from ..test_report import CHROMIUM_FLAGS, _Body  # how the project drives headless Chromium


@pytest.fixture(scope="module")
def circuit():
    gt = load("route")
    return discover(gt.model, gt.clean, gt.corrupted, gt.metric, positions=gt.positions, curve=False, progress=False)


def notebook_output(obj) -> str:
    """What Jupyter/Colab displays for a cell whose value is ``obj``: its text/html."""
    from IPython.core.interactiveshell import InteractiveShell

    data, _ = InteractiveShell.instance().display_formatter.format(obj)
    return data["text/html"]


def test_the_html_draws_lanes_nodes_and_edges(circuit):
    html = notebook_output(circuit)
    assert html.count('class="node"') == len(circuit.nodes) == 4
    assert html.count('class="edge"') == len(circuit.edges) == 3
    for lane in ("object", "subject", "last"):
        assert f">{lane}</text>" in html
    assert "what is the color of the circle ?" not in html  # the question lane has no node: not drawn
    assert ">circle</text>" in html  # the subject lane shows its word
    # every edge carries the answer here (patching it lowers the metric): red; value inputs: solid lines
    assert html.count(f'stroke="{POSITIVE}" stroke-opacity') == 3 and f'stroke="{NEGATIVE}" stroke-opacity' not in html
    assert "stroke-dasharray" not in html and "(value): score -" in html
    # the object's thumbnail is its patch of the input image; the locator outlines it on the whole image
    thumbs = re.findall(r'href="data:image/png;base64,([^"]+)"', html)
    from PIL import Image

    sizes = {Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbs}
    assert sizes == {(48, 48), (32, 32)}  # the 8 px patch (shown at 48 px) and the whole 32 px image
    assert "rows 1-1, cols 2-2: pixels x 16-24, y 8-16 of the 32x32 input" in html
    assert "http" not in html.replace("http://www.w3.org", "")  # nothing fetched


def test_widths_follow_the_score_and_styles_the_input():
    diagram = circuit_diagram({("input@image", "L0H0@last.k"): -2.0, ("L0H0@last", "logits@last"): 1.0,
                               ("input@last", "L0H0@last.q"): -0.5}, n_layers=1)
    diagram.answer_sign = -1
    html = diagram.to_html()
    widths = {m[0]: float(m[1]) for m in re.findall(r'data-w="([\d.]+)".*?stroke-width="([\d.]+)"', html)}
    assert widths["2"] > widths["1"] > widths["0.5"]
    assert 'stroke-dasharray="6,3"' in html and 'stroke-dasharray="2,3"' in html
    assert html.count(f'stroke="{NEGATIVE}" stroke-opacity') == 1  # the one positive score works against the answer


def test_save_is_self_contained(circuit, tmp_path):
    path = tmp_path / "circuit.html"
    circuit.diagram().save(str(path))
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "<script>" in page and "src=" not in page


PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var root = document.querySelector('.mm-circuit'), out = {};
  function shown(selector) {
    return Array.prototype.filter.call(root.querySelectorAll(selector), function (e) {
      if (getComputedStyle(e).display === 'none') return false;
      return e.tagName === 'path' ? e.getTotalLength() > 0 : e.getBoundingClientRect().width > 0;
    }).length;
  }
  out.nodes = shown('.node'); out.edges = shown('.edge');
  out.count = root.querySelector('span[id$="_n"]').textContent;
  var slider = root.querySelector('input[type=range]');
  slider.value = THRESHOLD; slider.dispatchEvent(new Event('input'));
  out.nodes_after = shown('.node'); out.edges_after = shown('.edge');
  var locator = root.querySelector('.locator');
  out.locator_before = getComputedStyle(locator).display;
  root.querySelector('.node[data-n="input@object"]').dispatchEvent(new Event('mouseenter'));
  out.locator_hover = getComputedStyle(locator).display;
  document.body.setAttribute('data-probe', JSON.stringify(out));
}, 300); });
</script></body>"""


def probe_in_chromium(obj, probe: str, tmp_path) -> tuple[dict, str]:
    """What ``probe`` (a script ending in ``</body>`` that writes JSON to ``data-probe``) reads from ``obj``'s
    notebook output in headless Chromium, and Chromium's log."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (apt-get install chromium)")
    page = tmp_path / "cell.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{notebook_output(obj)}" + probe)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = _Body()
    body.feed(proc.stdout)
    return json.loads(body.attrs["data-probe"]), proc.stderr


@pytest.mark.slow
def test_notebook_output_renders_in_headless_chromium(circuit, tmp_path):
    scores = sorted(abs(e.score) for e in circuit.edges)
    threshold = (scores[0] + scores[1]) / 2  # hides the weakest edge (into the logits) and the logits node
    probe, log = probe_in_chromium(circuit, PROBE.replace("THRESHOLD", repr(threshold)), tmp_path)
    assert (probe["nodes"], probe["edges"]) == (4, 3) and probe["count"] == "3 edges, 4 nodes shown"
    weakest = min(circuit.edges, key=lambda e: abs(e.score))
    assert weakest.receiver == "logits@last"
    assert (probe["nodes_after"], probe["edges_after"]) == (3, 2)
    assert (probe["locator_before"], probe["locator_hover"]) == ("none", "inline")
    errors = [l for l in log.splitlines() if "CONSOLE" in l and ("Uncaught" in l or "Error" in l)]
    assert not errors, errors
