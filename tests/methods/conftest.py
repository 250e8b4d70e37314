import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava

PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
EXACT = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


@pytest.fixture(scope="package")
def model():
    hf, proc = tiny_llava(seed=0, text_layers=3, vision_layers=2)
    m = HookedVLM.from_hf(hf, proc, **EXACT)
    m.eval()
    return m


@pytest.fixture(scope="package")
def pair(model):
    clean = model.to_inputs(random_image(0), PROMPT)
    corrupted = model.to_inputs(random_image(1), PROMPT)
    return clean, corrupted


def padded_pair(model, side: str):
    """(clean, corrupted): two prompts of different lengths padded on ``side``, different images."""
    prompts = [PROMPT, "USER: <image>\nwhat is this ? ASSISTANT:"]
    clean = model.to_inputs([random_image(0), random_image(1)], prompts, padding_side=side)
    corrupted = model.to_inputs([random_image(2), random_image(3)], prompts, padding_side=side)
    assert clean.padded
    return clean, corrupted


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield
