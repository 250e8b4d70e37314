import json

import pytest

from mm_lens import HookedVLM
from mm_lens.analysis import groups
from mm_lens.data import CONSTRAINT_TEMPLATE, Example, load_hf, load_jsonl, save_jsonl, to_inputs
from mm_lens.testing import random_image, tiny_llava


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    random_image(0, size=(32, 32)).save(tmp_path / "images" / "a.png")
    random_image(1, size=(40, 48)).save(tmp_path / "images" / "b.png")
    rows = [
        {"image": "images/a.png", "question": "what is the color of this building ?", "answer": "red",
         "constraint": "this building", "id": "a"},
        {"image": "images/b.png", "question": "where is the cat ?", "answer": "left", "box": [0, 0, 16, 16],
         "source": "gqa"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return tmp_path


def test_jsonl_round_trip(folder):
    examples = load_jsonl(str(folder / "data.jsonl"))
    assert [e.answer for e in examples] == ["red", "left"]
    assert examples[0].constraint == "this building" and examples[0].box is None
    assert examples[1].box == (0, 0, 16, 16) and examples[1].extra == {"source": "gqa"}
    assert examples[0].load_image().size == (32, 32)
    save_jsonl(examples + [Example(random_image(2), "what is this ?", "cat", id="c")], str(folder / "out.jsonl"))
    again = load_jsonl(str(folder / "out.jsonl"))
    assert [e.to_dict() for e in again[:2]] == [e.to_dict() for e in examples]
    assert again[2].load_image().size == (48, 40)


def test_errors_and_aliases(folder):
    (folder / "bad.jsonl").write_text('{"image": "images/a.png", "question": "q"}\n')
    with pytest.raises(ValueError, match="answer"):
        load_jsonl(str(folder / "bad.jsonl"))
    (folder / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        load_jsonl(str(folder / "broken.jsonl"))
    rows = [{"image": random_image(3), "question": "what is this building ?", "answer": "red",
             "main_entity": "this building", "bbox": [2, 4, 10, 10]}]
    ex = load_hf(rows, box_format="xywh")[0]
    assert ex.constraint == "this building" and ex.box == (2, 4, 12, 14)
    assert load_hf([{"picture": random_image(3), "question": "q", "answer": "a"}],
                   columns={"picture": "image"})[0].answer == "a"


def test_examples_become_inputs_with_groups(folder):
    hf, proc = tiny_llava()
    model = HookedVLM.from_hf(hf, proc, fold_ln=False, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False)
    examples = load_jsonl(str(folder / "data.jsonl"))
    inputs = to_inputs(model, examples, with_answer=True)
    q = groups.resolve(model, inputs[0], "question")
    assert model.to_str_tokens(inputs[0])[int(q[0]):int(q[-1]) + 1] == "what is the color of this building ?".split()
    assert inputs[0].meta["answer"] == "red" and model.to_str_tokens(inputs[0])[-1] == "red"
    assert len(groups.resolve(model, inputs[1], "object")) >= 1
    with pytest.warns(UserWarning, match=r"'building\?'"):  # the test tokenizer is word-level: it says so
        c = examples[0].to_inputs(model, CONSTRAINT_TEMPLATE)
    assert c.positions.span("this building").numel() == 2
    assert groups.resolve(model, c, "question").numel() == 7  # "?" dropped: the template adds it


def test_bundled_examples_are_accepted_where_examples_are():
    """The toy's own examples fill ``meta`` like ``mm_lens.data.Example`` and go into dataset methods."""
    from mm_lens import load_toy
    from mm_lens.analysis import visual_token_budget
    from mm_lens.toy import data

    model = load_toy(device="cpu")
    ex = data.make_examples(1, seed=0, kinds=("color",))[0]
    inputs = ex.to_inputs(model)
    assert inputs.meta["question"] == ex.question and inputs.meta["box"] == list(ex.box)
    q = groups.resolve(model, inputs, "question")
    assert model.to_str_tokens(inputs)[int(q[0]):int(q[-1]) + 1] == ex.question.split()
    budget = visual_token_budget(model, data.make_examples(2, seed=1), keep=[9, 0], progress=False)
    frame = budget.to_frame()
    assert len(frame) == 4 and (frame.groupby("keep").loss.mean()[0] > frame.groupby("keep").loss.mean()[9])


def test_retraining_never_writes_over_the_bundled_model(monkeypatch, tmp_path):
    from mm_lens.toy import WEIGHTS
    from mm_lens.toy.train import parse_args

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parse_args([]).out == tmp_path / "mm_lens" / "shapes"
    assert parse_args(["--out", str(tmp_path / "mine")]).out == tmp_path / "mine"
    assert parse_args(["--replace-bundled"]).out == WEIGHTS
    with pytest.raises(SystemExit):
        parse_args(["--replace-bundled", "--out", "x"])
