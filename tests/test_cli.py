"""The mm-lens command: help, errors with a non-zero exit, info and run on a model folder."""

import subprocess
import sys

import pytest

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
    assert html.count("<img") >= 5 and "knockout" in html and "causal trace" in html
