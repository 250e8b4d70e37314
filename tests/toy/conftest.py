import pytest

from mm_lens import load_toy
from mm_lens.toy import data


@pytest.fixture(scope="session")
def toy():
    return load_toy(device="cpu")


@pytest.fixture(scope="session")
def color_examples():
    """Held-out colour questions (one asked object each, its box known)."""
    return data.make_examples(24, seed=4242, kinds=("color",))[:8]
