"""from_pretrained on a local Hugging Face folder, through Hugging Face's own (safetensors) loaders."""

import json

import pytest
import torch

from mm_lens import HookedVLM, supported_architectures
from tests.conftest import NO_PROCESSING, PROMPT


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llava_pair):
    hf, processor, _ = llava_pair
    folder = tmp_path_factory.mktemp("tiny-llava")
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_from_pretrained_local_folder_matches_hf(saved, llava_pair, image):
    hf, processor, _ = llava_pair
    assert any(p.suffix == ".safetensors" for p in saved.iterdir())
    model = HookedVLM.from_pretrained(str(saved), device="cpu", **NO_PROCESSING)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    torch.testing.assert_close(model(model.to_inputs(image, PROMPT)), hf(**enc).logits, atol=1e-4, rtol=0)
    assert model.cfg.model_name == str(saved)


def test_from_pretrained_dtype_and_processing(saved, image):
    model = HookedVLM.from_pretrained(str(saved), device="cpu", dtype=torch.float64)
    assert model.W_E.dtype == torch.float64 and model.cfg.dtype == torch.float64
    assert model.cfg.normalization_type == "RMSPre"  # TransformerLens defaults fold the norms
    logits = model(model.to_inputs(image, PROMPT))
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_unsupported_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*supported"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_supported_architectures_lists_parity_tests():
    rows = supported_architectures()
    assert any(r["architecture"] == "LlavaForConditionalGeneration" for r in rows)
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    for r in rows:
        assert (root / r["parity_test"]).exists(), r


def test_every_convertible_architecture_is_listed():
    from mm_lens.conversion import FAMILIES

    listed = {r["architecture"] for r in supported_architectures()}
    assert set(FAMILIES) - listed == set()


def test_half_precision_keeps_rotary_frequencies_float32(llava_pair, image):
    hf, processor, reference = llava_pair
    model = HookedVLM.from_hf(hf, processor, device="cpu", dtype=torch.bfloat16, **NO_PROCESSING)
    assert model.W_Q.dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary.inv_freq, reference.rotary.inv_freq)
    inputs = model.to_inputs(image, PROMPT)
    probs = model(inputs)[0, -1].float().softmax(-1)
    ref = reference(inputs)[0, -1].softmax(-1)
    assert float((probs - ref).abs().max()) < 0.05
