"""The bundled testbed model ``mm-lens/shapes``: a small LLaVA trained on synthetic shapes VQA.

``load_toy()`` returns it as a :class:`~mm_lens.HookedVLM`; :mod:`mm_lens.toy.data` makes
examples with ground-truth boxes; ``python -m mm_lens.toy.train`` / ``.evaluate`` retrain and
score it.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
NAME = "mm-lens/shapes"


def load_toy(device=None, **kwargs):
    """The bundled shapes model: exactly ``HookedVLM.from_pretrained('mm-lens/shapes', device, **kwargs)``.

    So, as for every checkpoint, weight processing is on by default (TransformerLens' defaults); pass
    ``fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False`` for
    Hugging Face's exact activations.
    """
    from mm_lens import HookedVLM

    return HookedVLM.from_pretrained(NAME, device=device, **kwargs)
