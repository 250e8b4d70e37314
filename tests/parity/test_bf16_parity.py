"""bfloat16 parity beside the float32 tests: mm_lens loaded in bf16 against Hugging Face run in bf16.

bf16 keeps ~3 significant digits, so exact agreement is not expected. Stated bounds, at the last position
of every row of a padded batch of two (image + prompt):
- top-1 agreement with Hugging Face bf16 wherever float32's top-2 margin exceeds ``MARGIN``;
- max |log p(mm_lens bf16) - log p(Hugging Face bf16)| over the vocabulary below ``LOGPROB_ATOL`` nats
  (measured: 0.011-0.021 on these models);
- mm_lens bf16 no further from float32 than Hugging Face bf16 is, within a factor ``SLACK`` (+ 0.01):
  the bf16 error is bf16's, not the conversion's.
Weight processing (fold_ln, centring) is done in float32 and then cast, so it is checked too.
LLaVA goes through a bf16 checkpoint folder and both loaders; LLaVA-NeXT, a Phi-2/SigLIP LLaVA, Gemma 3 and
LLaVA-OneVision are converted from Hugging Face models in memory.
"""

import copy

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_gemma3, tiny_llava_next, tiny_llava_onevision, tiny_llava_towers
from tests.conftest import NO_PROCESSING, PROMPT
from tests.parity.compare import transpose_heads_

LOGPROB_ATOL = 0.05
SLACK = 2.0
MARGIN = 0.05
PROMPTS = [PROMPT, "USER: <image>\nwhere is the red square ? answer in a few words . ASSISTANT:"]


def _last_log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float().log_softmax(-1)


def _hf_logits(hf, enc, dtype):
    enc = {k: v.to(dtype) if v.is_floating_point() else v for k, v in enc.items()}
    return hf(**enc).logits


def assert_bf16_parity(ours_logits, hf_bf16_logits, hf_f32_logits) -> dict:
    ours, ref, exact = (_last_log_probs(x) for x in (ours_logits, hf_bf16_logits, hf_f32_logits))
    numbers = dict(vs_hf_bf16=float((ours - ref).abs().max()), ours_vs_f32=float((ours - exact).abs().max()),
                   hf_bf16_vs_f32=float((ref - exact).abs().max()))
    assert numbers["vs_hf_bf16"] < LOGPROB_ATOL, numbers
    assert numbers["ours_vs_f32"] < SLACK * numbers["hf_bf16_vs_f32"] + 0.01, numbers
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > MARGIN
    assert bool(clear.any()), "no row with a clear top-1: pick another seed"
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear]), numbers
    return numbers


@pytest.fixture(scope="module")
def llava_bf16_folder(tmp_path_factory):
    hf, processor = tiny_llava_towers("llama", "clip", seed=3)
    folder = tmp_path_factory.mktemp("llava-bf16")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return hf, processor, folder


@pytest.mark.parametrize("processing", [False, True], ids=["exact", "processed"])
def test_llava_from_a_bf16_checkpoint(llava_bf16_folder, processing):
    from transformers import LlavaForConditionalGeneration

    hf32, processor, folder = llava_bf16_folder
    kwargs = {} if processing else NO_PROCESSING
    model = HookedVLM.from_pretrained(str(folder), device="cpu", dtype="bfloat16", **kwargs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.cfg.dtype == torch.bfloat16
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    hf.set_attn_implementation("eager")
    exact = copy.deepcopy(hf).float()  # the same (bf16-rounded) weights, run in float32
    images = [random_image(1), random_image(2, size=(60, 30))]
    enc = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    ours = model(model.to_inputs(images, PROMPTS))
    assert ours.dtype == torch.bfloat16
    assert_bf16_parity(ours, _hf_logits(hf, enc, torch.bfloat16), _hf_logits(exact, enc, torch.float32))


GEMMA3_PROMPTS = [p.replace("<image>", "<start_of_image>") for p in PROMPTS]
FAMILIES = {  # builder, prompts, images grouped per prompt (None: one image per prompt, as a flat list)
    "llava-next": (lambda: tiny_llava_next(seed=3), PROMPTS, None),
    "phi-siglip": (lambda: tiny_llava_towers("phi", "siglip", seed=3), PROMPTS, None),
    # Gemma 3: sliding window, image groups, sandwich and q/k norms; a second prompt with two images
    "gemma3": (lambda: tiny_gemma3(seed=4), [GEMMA3_PROMPTS[0], GEMMA3_PROMPTS[1].replace(
        "<start_of_image>", "<start_of_image> <start_of_image>")], [[0], [1, 2]]),
    # OneVision: a reduced tile map in one row, the multi-image mode in the other
    "onevision": (lambda: tiny_llava_onevision(seed=3), [PROMPTS[0], PROMPTS[1].replace("<image>", "<image> <image>")],
                  [[0], [1, 2]]),
}


@pytest.mark.parametrize("processing", [False, True], ids=["exact", "processed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_in_bf16(family, processing):
    build, prompts, grouping = FAMILIES[family]
    hf, processor = build()
    hf.set_attn_implementation("eager")
    model = HookedVLM.from_hf(hf, processor, device="cpu", dtype=torch.bfloat16,
                              **({} if processing else NO_PROCESSING))
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    pool = [random_image(1), random_image(2, size=(60, 30)), random_image(3, size=(44, 52))]
    images = pool[:2] if grouping is None else [[pool[i] for i in g] for g in grouping]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ours = model(model.to_inputs(images, prompts))
    assert_bf16_parity(ours, _hf_logits(hf_bf16, enc, torch.bfloat16), _hf_logits(hf, enc, torch.float32))


def test_the_bounds_are_sharp(llava_bf16_folder):
    """One transposed head in bf16 breaks the bounds (they are not so loose that anything passes)."""
    hf32, processor, folder = llava_bf16_folder
    model = HookedVLM.from_pretrained(str(folder), device="cpu", dtype="bfloat16", **NO_PROCESSING)
    W = model.blocks[1].attn.W_Q.data
    transpose_heads_(W)
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    images = [random_image(1), random_image(2, size=(60, 30))]
    enc = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(AssertionError):
        assert_bf16_parity(model(model.to_inputs(images, PROMPTS)), _hf_logits(hf, enc, torch.bfloat16),
                           _hf_logits(copy.deepcopy(hf).float(), enc, torch.float32))
