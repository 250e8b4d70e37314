"""weights_conversion/convert.py: original layouts -> a LLaVA folder that HookedVLM and Hugging Face load."""

import runpy
from pathlib import Path

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image
from tests.conftest import NO_PROCESSING
from tests.parity.test_bunny_parity import IMAGE_TOKEN_INDEX, PROMPT, make_bunny

SCRIPT = Path(__file__).resolve().parents[1] / "weights_conversion" / "convert.py"
VERIFY = ["--verify", "--prompt", "<image>\nwhat is the color of the circle ?"]  # words the tiny tokenizer knows


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(SCRIPT))["main"]


def test_bunny_round_trip_and_verify(main, tmp_path_factory, capsys):
    ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, "cli", drop_last_layer=True, lm_head_bias=False)
    out = tmp_path_factory.mktemp("out")
    assert main([str(folder), "--format", "bunny", "--vision-tower", str(tower), "--out", str(out), *VERIFY]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "hooked_vs_hf" in printed
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = HookedVLM.from_pretrained(str(out), device="cpu", **NO_PROCESSING)
    assert model.cfg.original_architecture == "LlavaForConditionalGeneration"
    inputs = model.to_inputs(random_image(1, size=(28, 28)), PROMPT)
    with torch.no_grad():
        out_ref, _ = ref(ref.input_ids(tokenizer, PROMPT), inputs.pixel_values)
        torch.testing.assert_close(model(inputs), out_ref.logits, atol=1e-4, rtol=0)
    assert IMAGE_TOKEN_INDEX not in inputs.input_ids.tolist()


def test_bias_in_lm_head_is_refused_with_a_fix(main, tmp_path_factory):
    ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, "cli-bias", drop_last_layer=True, lm_head_bias=True)
    with pytest.raises(ValueError, match="from_pretrained"):
        main([str(folder), "--format", "bunny", "--vision-tower", str(tower),
              "--out", str(tmp_path_factory.mktemp("o"))])


def test_wrong_format_is_an_error(main, tmp_path_factory):
    ref, tokenizer, folder, tower = make_bunny(tmp_path_factory, "cli-fmt", drop_last_layer=True, lm_head_bias=False)
    with pytest.raises(ValueError, match="not an original-layout LLaVA"):
        main([str(folder), "--format", "llava-original", "--vision-tower", str(tower),
              "--out", str(tmp_path_factory.mktemp("o"))])


@pytest.mark.parametrize("text, fmt", [("llama", "llava-original"), ("phi", "llava-phi")])
def test_llava_original_and_phi_round_trip(main, tmp_path_factory, capsys, text, fmt):
    from mm_lens.testing import tiny_llava_towers
    from tests.parity.test_llava_original_parity import write_original_layout

    hf, processor = tiny_llava_towers(text, "clip", seed=2, n_kv_heads=4)
    folder, tower, out = (tmp_path_factory.mktemp(n) for n in ("src", "clip", "out"))
    with torch.no_grad():
        write_original_layout(hf, processor, folder, tower)
    assert main([str(folder), "--format", fmt, "--vision-tower", str(tower), "--out", str(out), *VERIFY]) == 0
    assert "verified" in capsys.readouterr().out
    model = HookedVLM.from_pretrained(str(out), device="cpu", **NO_PROCESSING)
    image = random_image(1)
    enc = processor(images=image, text="USER: <image>\nwhat is this ? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(model.to_inputs(image, "USER: <image>\nwhat is this ? ASSISTANT:")),
                                   hf(**enc).logits, atol=1e-4, rtol=0)
