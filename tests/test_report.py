"""The demo report: every analysis has its section, a corruption that does not corrupt is said in words,
and in a real (headless) browser every figure decodes, the console shows no error and the attention
view's token labels (``<s>``, ``<img r,c>``) are visible text inside the view, not swallowed as HTML."""

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from mm_lens.demo import DESCRIPTIONS, Case, build_report, demo

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000"]

# Added to a copy of the report: after rendering, what the attention view shows, as attributes of <body>.
PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var view = document.querySelector('div.attention'), shown = [];
  view.querySelectorAll('*').forEach(function (el) {
    if (el.children.length) return;
    var text = el.textContent.replace(/\\u00a0/g, ' '), box = el.getBoundingClientRect();
    if (text && box.width > 0 && box.height > 0 && getComputedStyle(el).visibility !== 'hidden') shown.push(text);
  });
  document.body.setAttribute('data-view-labels', JSON.stringify(shown));
  document.body.setAttribute('data-view-text', view.innerText);
}, 1000); });
</script></body>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return demo(tmp_path_factory.mktemp("report"), n_examples=2)


def test_report_has_every_section(report):
    html = report.read_text()
    for text in ("logit lens", "knockout", "activation patching", "attribution patching", "path patching",
                 "causal trace", "attention contribution", "MultEdit", "visual tokens", "attention from the last "
                 "position", "cosine of the visual tokens"):
        assert text in html, text
    for name in DESCRIPTIONS:
        assert f"<td>{name}</td>" in html, name
    assert html.count("data:image/png;base64,") >= 2 * 14
    assert "model: mm-lens/shapes" in html and "toy/weights" not in html


def test_report_says_when_the_corruption_does_not_corrupt():
    from mm_lens import load_toy
    from mm_lens.toy import data

    model = load_toy(device="cpu")
    ex = data.make_examples(4, seed=3, kinds=("color",))[1]
    empty = next(c for c in range(9) if c not in {o.cell for o in ex.objects})
    row, col = divmod(empty, data.CELLS)
    background = (col * data.CELL + 2, row * data.CELL + 2, col * data.CELL + 12, row * data.CELL + 12)
    report = build_report(model, [Case(ex.image, ex.prompt, ex.question, ex.answer, background)], ["patching"])
    html = report.render()
    assert '<p class="warning">activation patching: not drawn.' in html and "barely changes the metric" in html
    assert not report.figures


class _Body(HTMLParser):
    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.attrs = dict(attrs)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (apt-get install chromium)")
    page = tmp_path / "probed.html"
    page.write_text(report.read_text().replace("</body>", PROBE))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    n_images = dom.count("<img ")
    assert n_images >= 28
    body = _Body()
    body.feed(dom)
    assert body.attrs.get("data-figures") == f"{n_images}/{n_images}", "some figures did not decode"
    console_errors = [l for l in proc.stderr.splitlines()
                      if "CONSOLE" in l and ("Uncaught" in l or ":ERROR:" in l or "Error" in l)]
    assert not console_errors, console_errors
    labels = json.loads(body.attrs["data-view-labels"])
    for token in ("<s>", "<img 0,0>", "<img 2,2>", "USER:", "ASSISTANT:"):
        assert token in labels, (token, labels[:40])
    # the view holds only itself: the sections after it are not pulled inside
    assert "the answer's probability read off" not in body.attrs["data-view-text"]
    assert len(body.attrs["data-view-text"]) < 2000
