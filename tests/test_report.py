"""The demo report renders in a real browser: every figure decodes and the console shows no error."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mm_lens.demo import demo, run_analyses, toy_cases
from mm_lens.toy import WEIGHTS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The demo report on the bundled model; on a tiny random LLaVA while no weights are shipped."""
    out = tmp_path_factory.mktemp("report")
    if (WEIGHTS / "config.json").exists():
        return demo(out, n_examples=2)
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava

    hf, processor = tiny_llava(seed=2)
    model = HookedVLM.from_hf(hf, processor, device="cpu")
    cases = [c.__class__(c.image, c.prompt, c.question, None, c.box, c.title) for c in toy_cases(2)]
    return run_analyses(model, cases, out, title="mm_lens report on a random LLaVA")


def test_report_has_every_section(report):
    html = report.read_text()
    for text in ("logit lens", "knockout", "patching", "causal trace", "attention from the last position"):
        assert text in html, text
    assert html.count("data:image/png;base64,") >= 2 * 7


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               Path(report).resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    n_images = dom.count("<img ")
    assert n_images >= 14
    assert f'data-figures="{n_images}/{n_images}"' in dom, "some figures did not decode"
    console_errors = [l for l in proc.stderr.splitlines()
                      if "CONSOLE" in l and ("Uncaught" in l or ":ERROR:" in l or "Error" in l)]
    assert not console_errors, console_errors
