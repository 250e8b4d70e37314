import pytest

from mm_lens import load_toy
from mm_lens.data import Example
from mm_lens.toy import data as toy


@pytest.fixture(scope="package")
def model():
    return load_toy()


def toy_examples(n: int, seed: int = 0, kinds=toy.KINDS) -> list[Example]:
    """Shapes examples as mm_lens.data.Example (ids "t0", "t1", ...; the question kind in extra)."""
    return [Example(e.image, e.question, e.answer, box=e.box, id=f"t{i}", extra={"kind": e.kind})
            for i, e in enumerate(toy.make_examples(n, seed, kinds=kinds))]


@pytest.fixture(scope="package")
def examples():
    return toy_examples(8, seed=3, kinds=("color", "shape", "where"))  # every one has its object's box
