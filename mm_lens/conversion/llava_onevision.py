"""LLaVA-OneVision (Hugging Face ``LlavaOnevisionForConditionalGeneration``): SigLIP + Qwen2 (any LLaVA tower).

The towers, the projector and ``image_newline`` are LLaVA-NeXT's (same key tables); the tiling differs in two
ways, both in its image pipeline (:mod:`mm_lens.components.anyres`): a tile map of more than about N tiles'
worth of patches is shrunk by bilinear interpolation (``vision_aspect_ratio="anyres_max_N"``), and several
images in one prompt are not tiled (the processor's multi-image mode: each is its base grid and one newline).
Videos are not supported.
"""

from __future__ import annotations

import re

from mm_lens.config import VLMConfig
from mm_lens.conversion import llava, llava_next

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
MODEL_TYPE = "llava_onevision"


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    cfg = llava.translate_config(hf_cfg, model_name=model_name)
    ratio = getattr(hf_cfg, "vision_aspect_ratio", "anyres_max_9")
    found = re.fullmatch(r"anyres_max_(\d+)", ratio or "")
    if found is None:
        raise ValueError(f"vision_aspect_ratio {ratio!r} is not supported (Hugging Face reads only 'anyres_max_N')")
    extra = dict(image_pipeline="anyres", image_grid_pinpoints=[list(p) for p in hf_cfg.image_grid_pinpoints],
                 anyres_max=int(found.group(1)), multi_image_mode=True)
    return cfg.replace(original_architecture=ARCHITECTURE, extra={**cfg.extra, **extra})


conversion_rules = llava_next.conversion_rules
