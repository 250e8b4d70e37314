"""The constructed models of the known-answer tests live in the package (mm_lens.circuits.groundtruth)."""

from mm_lens.circuits.groundtruth.build import hooked  # noqa: F401
from mm_lens.circuits.groundtruth.fixed_copy import (  # noqa: F401
    COPY_LAYER,
    P_COL,
    P_ROW,
    PAYLOAD,
    PROMPT,
    TARGET_WORD,
    copy_head_model,
    copy_inputs,
    patch_position,
)
