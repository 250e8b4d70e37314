"""Every family's tiny model with a clean and a corrupted input, shared by the tests that run one method on all
of them (tests/methods/test_families.py, tests/circuits/test_families.py).

A new family adds one :class:`Family`: a maker of its tiny Hugging Face model and processor, a prompt with the
family's image placeholder and :data:`QUESTION`, an image size and a box. :data:`FAMILIES` are the families every
method runs on; :data:`MORE_FAMILIES` add Gemma 3 (sliding windows, q/k norms, sandwich norms, bidirectional image
groups), LLaVA-OneVision and a parallel-block Phi tower (tests/methods/test_families_gemma.py covers the methods
on the first two with several images).
"""

from dataclasses import dataclass
from typing import Callable

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_gemma3, tiny_llava, tiny_llava_next, tiny_llava_onevision, tiny_llava_towers
from mm_lens.testing_qwen import tiny_qwen_vl
from mm_lens.testing_tiled import tiny_idefics3, tiny_internvl

QUESTION = "what is the color of the circle ?"


@dataclass(frozen=True)
class Family:
    make: Callable  # () -> (Hugging Face model, processor)
    prompt: str  # with the family's image placeholder and QUESTION
    size: tuple  # (height, width) of the test images
    box: tuple  # (x0, y0, x1, y1) in pixels of the original image


LLAVA_PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"
QWEN_PROMPT = f"<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> {QUESTION} <|im_end|>"
FAMILIES = {
    "llava-1.5": Family(lambda: tiny_llava(seed=0, text_layers=3, vision_layers=2), LLAVA_PROMPT, (40, 48),
                        (4, 6, 28, 30)),
    "llava-next": Family(lambda: tiny_llava_next(seed=5), LLAVA_PROMPT, (40, 70), (5, 12, 29, 30)),
    "qwen2-vl": Family(lambda: tiny_qwen_vl("2", seed=3), QWEN_PROMPT, (70, 90), (10, 10, 50, 40)),
    "qwen2.5-vl": Family(lambda: tiny_qwen_vl("2.5", seed=3), QWEN_PROMPT, (70, 90), (10, 10, 50, 40)),
    "qwen3-vl": Family(lambda: tiny_qwen_vl("3", seed=3), QWEN_PROMPT, (70, 90), (10, 10, 50, 40)),
    "idefics3": Family(lambda: tiny_idefics3("idefics3", seed=3), LLAVA_PROMPT, (40, 70), (10, 10, 50, 30)),
    "smolvlm": Family(lambda: tiny_idefics3("smolvlm", seed=4), LLAVA_PROMPT, (40, 70), (10, 10, 50, 30)),
    "internvl": Family(lambda: tiny_internvl(seed=3), f"USER: <IMG_CONTEXT>\n{QUESTION} ASSISTANT:", (40, 70),
                       (10, 10, 50, 30)),
}
MORE_FAMILIES = {
    "gemma3": Family(lambda: tiny_gemma3(seed=3), f"USER: <start_of_image>\n{QUESTION} ASSISTANT:", (64, 80),
                     (8, 4, 40, 30)),
    "llava-onevision": Family(lambda: tiny_llava_onevision(seed=3, anyres_max=2), LLAVA_PROMPT, (64, 80),
                              (8, 4, 40, 30)),
    "llava-phi": Family(lambda: tiny_llava_towers("phi", "clip", seed=2), LLAVA_PROMPT, (40, 48), (4, 6, 28, 30)),
}


def make_case(name: str, **weight_processing):
    """(model, clean input with question and box, corrupted input: another image) for family ``name``;
    ``weight_processing``: as :meth:`HookedVLM.from_hf` (TransformerLens' defaults if none)."""
    spec = {**FAMILIES, **MORE_FAMILIES}[name]
    hf, processor = spec.make()
    model = HookedVLM.from_hf(hf, processor, device="cpu", **weight_processing).eval()
    clean = model.to_inputs(random_image(1, size=spec.size), spec.prompt)
    clean.meta.update(question=QUESTION, box=spec.box)
    corrupted = model.to_inputs(random_image(2, size=spec.size), spec.prompt)
    corrupted.meta.update(clean.meta)
    return model, clean, corrupted
