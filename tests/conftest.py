import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava

# tiny models: one thread is much faster than several on a small, shared machine
torch.set_num_threads(1)

NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def llava_pair():
    """(hf_model, processor, HookedVLM without weight processing) for one tiny random LLaVA."""
    hf, processor = tiny_llava(seed=0)
    model = HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)
    return hf, processor, model


@pytest.fixture(scope="session")
def image():
    return random_image(seed=1)


@pytest.fixture(scope="session")
def image2():
    return random_image(seed=2, size=(50, 36))
