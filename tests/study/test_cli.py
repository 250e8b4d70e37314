"""mm-lens study: runs a method over a data file, resumes, summarises, and explains its options."""

import pytest

from mm_lens import study
from mm_lens.cli import main
from mm_lens.data import save_jsonl
from mm_lens.study.cli import parse_settings

from .conftest import toy_examples


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--model", "--data", "--out", "--engine", "--workers", "--ray-address", "--set", "--summary"):
        assert option in out


def test_study_from_the_command_line_resumes_and_summarises(tmp_path, capsys):
    save_jsonl(toy_examples(4, seed=1, kinds=("color",)), str(tmp_path / "q.jsonl"))
    args = ["study", "knockout", "--model", "mm-lens/shapes", "--data", str(tmp_path / "q.jsonl"),
            "--out", str(tmp_path / "res"), "--set", "window=1", "--set", 'edges=["image->last"]', "--columns", "kind"]
    assert main(args + ["--limit", "2"]) == 0
    assert "2 ok, 0 dropped, 0 errors (2 run now, 0 already done)" in capsys.readouterr().out
    assert main(args + ["--summary"]) == 0
    out = capsys.readouterr().out
    assert "4 ok, 0 dropped, 0 errors (2 run now, 2 already done)" in out and "image->last" in out
    df = study.load_results(str(tmp_path / "res"))
    assert set(df["kind"]) == {"color"} and len(df) == 4 * 3
    assert (tmp_path / "res" / "summary.csv").exists()
    assert main(args[:-4] + ["--set", "window=3"]) == 2
    assert "method_kwargs.window: 1 -> 3" in capsys.readouterr().err


def test_settings_parse_as_json_or_text():
    assert parse_settings(["window=9", "edges=paper", 'layers=[1, 2]']) == {"window": 9, "edges": "paper",
                                                                           "layers": [1, 2]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["window"])
