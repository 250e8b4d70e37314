"""The Colab notebooks run end to end on the bundled model."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, substitutions: dict = None, timeout: int = 600):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        for old, new in (substitutions or {}).items():
            cell.source = cell.source.replace(old, new)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def test_notebooks_are_built_from_their_source():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_patching.ipynb", "03_knockout.ipynb",
                                           "04_causal_tracing_and_multedit.ipynb", "05_logit_lens_and_similarity.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = execute(path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") in ("execute_result", "display_data", "stream") for o in outputs)
