"""`mm-lens bench-methods`: prints the method x model table; bad names exit with status 2 and say why."""

import subprocess
import sys

from mm_lens.cli import main


def test_bench_methods_prints_the_table(capsys, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(["bench-methods", "--models", "copy_head", "--methods", "eap,knockout", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| method | copy_head |" in text and "| eap | 1.000 / 1.00 |" in text and "| knockout |" in text
    assert out.read_text().splitlines()[0].startswith("model,method,auroc,precision")


def test_bad_names_are_errors(capsys):
    assert main(["bench-methods", "--methods", "eap,acdc"]) == 2
    assert "unknown methods ['acdc']" in capsys.readouterr().err


def test_help_answers_without_torch():
    code = ("import sys; from mm_lens.cli import build_parser; build_parser().parse_args(['bench-methods']); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
