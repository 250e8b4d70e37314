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
    """The bundled shapes model, loaded through ``HookedVLM.from_pretrained('mm-lens/shapes')``.

    Weight processing is off by default here (activations equal Hugging Face's); pass
    ``fold_ln=True`` etc. to turn it on.
    """
    from mm_lens import HookedVLM

    for key in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
        kwargs.setdefault(key, False)
    return HookedVLM.from_pretrained(NAME, device=device, **kwargs)
