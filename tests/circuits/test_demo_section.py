"""The demo report's circuit section: the diagram, what it says, the faithfulness curve."""

from mm_lens import load_toy
from mm_lens.demo import build_report, toy_cases


def test_the_report_draws_the_circuit():
    report = build_report(load_toy(), toy_cases(1), ["circuit"])
    html = report.render()
    assert 'class="mm-circuit"' in html and "img " in html and "faithfulness, exact patching" in html
    (fig, caption), = report.figures
    assert "CPR" in fig.axes[0].get_title() and "MIB" in caption
