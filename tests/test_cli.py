"""The mm-lens command: help, errors with a non-zero exit, info and run on a model folder."""

import re
import subprocess
import sys
import time

import pytest

import mm_lens
from mm_lens.cli import main
from mm_lens.testing import random_image, tiny_llava


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--image", "--prompt", "--analysis", "--out", "--box", "--answer", "--trust-remote-code"):
        assert option in out


def test_bad_image_path_is_a_clear_error(capsys, tmp_path):
    code = main(["run", "mm-lens/shapes", "--image", str(tmp_path / "missing.png"), "--prompt", "what ?"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_unsupported_model_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    code = main(["info", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "unsupported architecture" in err and "LlavaForConditionalGeneration" in err
    assert main(["info", "not-a-model"]) == 2


def test_unknown_analysis_is_a_clear_error(capsys, tmp_path):
    image = tmp_path / "img.png"
    random_image(0).save(image)
    code = main(["run", "mm-lens/shapes", "--image", str(image), "--prompt", "x", "--analysis", "lens,magic"])
    assert code == 2 and "unknown analyses ['magic']" in capsys.readouterr().err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    hf, processor = tiny_llava(seed=1)
    out = tmp_path_factory.mktemp("model")
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_info_on_a_folder(capsys, folder):
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "LlavaForConditionalGeneration" in out and "16 tokens per image" in out


def test_run_writes_a_report(folder, tmp_path):
    image = tmp_path / "img.png"
    random_image(3).save(image)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "mm_lens.cli", "run", str(folder), "--image", str(image),
                           "--prompt", "USER: <image>\nwhat is the color of the circle ? ASSISTANT:",
                           "--analysis", "lens,knockout,patching,trace", "--question", "what is the color of the circle ?",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    html = (out / "index.html").read_text()
    assert html.count("<img") >= 4 and "knockout" in html
    # a random model: each patching section is either drawn or says its corruption does not corrupt
    assert "activation patching: the share" in html or "activation patching: not drawn" in html
    assert "causal trace:" in html and f"model: {folder}" in html


# ---------------------------------------------------------------- fast answers, checks before loading
def test_help_and_version_do_not_import_torch():
    code = ("import sys, runpy; sys.argv = ['mm-lens', '--version']\n"
            "try:\n    runpy.run_module('mm_lens.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["mm-lens", mm_lens.__version__, "False"], proc.stdout + proc.stderr
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mm_lens.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout and time.perf_counter() - started < 3.0


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "img.png"
    random_image(3, size=(40, 48)).save(path)
    return str(path)


def never_load(monkeypatch):
    """Any attempt to load a model fails the test: these checks must come first."""
    import mm_lens.model

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(mm_lens.model.HookedVLM, "from_pretrained", classmethod(fail))


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "  "], "--prompt is empty"),
    (["--question", "where is it"], "--question 'where is it' must be a non-empty part of --prompt"),
    (["--box", "10", "5", "60", "20"], r"--box 10 5 60 20 must satisfy 0 <= X0 < X1 <= 48"),
    (["--box", "10", "5", "4", "20"], "must satisfy"),
    (["--analysis", ","], "unknown analyses"),
])
def test_run_arguments_are_checked_before_loading(capsys, monkeypatch, picture, tmp_path, extra, message):
    never_load(monkeypatch)
    args = ["run", "mm-lens/shapes", "--image", picture, "--prompt", "what color is the circle ?",
            "--out", str(tmp_path / "out")] + extra
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_output_folder_and_image_are_checked(capsys, monkeypatch, picture, tmp_path):
    never_load(monkeypatch)
    (tmp_path / "taken").write_text("a file")
    assert main(["run", "mm-lens/shapes", "--image", picture, "--prompt", "x", "--out", str(tmp_path / "taken")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not a picture")
    assert main(["run", "mm-lens/shapes", "--image", str(tmp_path / "text.png"), "--prompt", "x"]) == 2
    assert "not an image PIL can read" in capsys.readouterr().err
    assert main(["demo", "--examples", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--examples must be at least 1" in capsys.readouterr().err


def test_unknown_models_fail_fast(capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert main(["info", "someone/no-such-model"]) == 2
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert main(["info", "./missing/folder"]) == 2
    assert "neither a local folder" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["info", "someone/no-such-model"]) == 2  # no network here: the hub does not answer
    err = capsys.readouterr().err
    assert "no model 'someone/no-such-model'" in err or "did not answer within 5 s" in err
    assert time.perf_counter() - started < 15


def test_unknown_answer_word_is_an_error(capsys, picture, tmp_path):
    code = main(["run", "mm-lens/shapes", "--image", picture, "--prompt", "what color is the circle ?",
                 "--answer", "dog", "--analysis", "lens", "--out", str(tmp_path / "out")])
    assert code == 2 and "'dog' (closest tokens:" in capsys.readouterr().err


def test_info_names_the_bundled_model(capsys):
    assert main(["info", "mm-lens/shapes"]) == 0
    out = capsys.readouterr().out
    assert "mm-lens/shapes" in out and "toy/weights" not in out and "context 256" in out
