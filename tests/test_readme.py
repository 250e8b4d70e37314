"""Every Python block of the README runs as written, on the bundled model (the README says which
strings change: the LLaVA hub id becomes the bundled model's name, ``shapes.png`` one of its pictures,
``questions.jsonl`` four of its questions)."""

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SUBSTITUTIONS = {'"llava-hf/llava-1.5-7b-hf"': '"mm-lens/shapes"'}


def test_readme_says_what_the_test_substitutes():
    text = README.read_text()
    assert len(BLOCKS) >= 3
    assert '`"llava-hf/llava-1.5-7b-hf"` replaced by `"mm-lens/shapes"`, `shapes.png`' in text
    assert "`questions.jsonl` by four of its questions" in text


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    from mm_lens.data import Example, save_jsonl
    from mm_lens.toy import data

    data.make_examples(1, seed=0, kinds=("color",))[0].image.save(tmp_path / "shapes.png")
    questions = [Example(e.image, e.question, e.answer, box=e.box, id=str(i))
                 for i, e in enumerate(data.make_examples(4, seed=5, kinds=("color",)))]
    save_jsonl(questions, str(tmp_path / "questions.jsonl"))
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    for old, new in SUBSTITUTIONS.items():
        code = code.replace(old, new)
    with warnings.catch_warnings(), torch.enable_grad():  # as in a fresh session
        warnings.simplefilter("error", UserWarning)  # e.g. a prompt word the model does not know
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
