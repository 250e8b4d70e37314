"""The Colab notebooks run end to end on the bundled model, and every figure cell displays a figure."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLOTS = re.compile(r"\b(plot_\w+|\w+_heatmap|knockout_curves|circuit_diagram)\(")
DISPLAYED = ("image/png", "text/html")


def execute(path: Path, substitutions: dict = None, timeout: int = 600):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        for old, new in (substitutions or {}).items():
            cell.source = cell.source.replace(old, new)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def figure_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "figure" in c.metadata.get("tags", [])]


def displayed(cell) -> set:
    return {mime for o in cell.get("outputs", []) if o.get("output_type") in ("execute_result", "display_data")
            for mime in o.get("data", {})}


def test_notebooks_are_built_from_their_source(tmp_path):
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_patching.ipynb", "03_knockout.ipynb",
                                           "04_causal_tracing_and_multedit.ipynb", "05_logit_lens_and_similarity.ipynb",
                                           "06_finding_a_circuit.ipynb"]
    import nbformat

    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import build_notebooks
    finally:
        sys.path.pop(0)
    for built in build_notebooks.build(tmp_path):
        assert built.read_text() == (ROOT / "notebooks" / built.name).read_text(), f"rebuild {built.name}"
        nb = nbformat.read(built, as_version=4)
        intro = nb.cells[0].source
        assert "USE_LLAVA = True" in intro and "14 GB" in intro and "names_filter" in intro
        install = nb.cells[1].source
        assert "MM_LENS_SOURCE = " in install.splitlines()[1] and "%pip install -q {MM_LENS_SOURCE}" in install
        # every cell that draws is tagged, so the test below checks that it displays
        untagged = [c.source[:60] for c in nb.cells if c.cell_type == "code" and PLOTS.search(c.source.splitlines()[-1])
                    and c not in figure_cells(nb)]
        assert not untagged, untagged
    assert sum(len(figure_cells(nbformat.read(p, as_version=4))) for p in NOTEBOOKS) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_displays_its_figures(path):
    nb = execute(path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = figure_cells(nb)
    assert figures or path.name.startswith("01_")
    for cell in figures:
        assert displayed(cell) & set(DISPLAYED), f"no image or HTML output from: {cell.source[:80]!r}"
        assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") and len(o["data"]) == 1
                       for o in cell.outputs), "a figure was shown as text"
    if path.name.startswith("04_"):  # the edit really changes the answer, as the text says
        printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
        before, after = re.search(r"edit: '(.*?)' -> '(.*?)'", printed).groups()
        grads = re.search(r"gradient norm per layer: \[(.*?)\] -> editing layer (\d+)", printed)
        norms = [float(x) for x in grads.group(1).split(",")]
        assert norms[int(grads.group(2))] == max(norms) > 0 and norms[-1] == 0.0
        assert before != after, printed
