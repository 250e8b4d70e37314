import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.circuits.runs import prepare
from mm_lens.testing import random_image, tiny_llava

PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
QUESTION = "what is the color of the circle ?"
EXACT = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


def metric(logits):
    return logits[:, -1, 7] - logits[:, -1, 9]


@pytest.fixture(scope="package")
def model():
    """A tiny random LLaVA: 3 layers, 4 heads sharing 2 key/value heads (grouped-query attention)."""
    hf, proc = tiny_llava(seed=0, text_layers=3, vision_layers=2)
    return HookedVLM.from_hf(hf, proc, **EXACT).eval()


@pytest.fixture(scope="package")
def pair(model):
    clean = model.to_inputs(random_image(0), PROMPT)
    corrupted = model.to_inputs(random_image(1), PROMPT)
    clean.meta["question"] = QUESTION
    return clean, corrupted


@pytest.fixture(scope="package")
def runs(model, pair):
    return prepare(model, *pair, metric)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield
