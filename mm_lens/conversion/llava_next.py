"""LLaVA-NeXT / LLaVA-1.6 (Hugging Face ``LlavaNextForConditionalGeneration``).

The towers and the projector are LLaVA's (same key tables, any supported text and vision
tower); in addition ``image_newline`` and the any-resolution tiling
(``image_grid_pinpoints``): the image pipeline of :mod:`mm_lens.components.anyres`.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mm_lens.config import VLMConfig
from mm_lens.conversion import llava
from mm_lens.conversion.common import Rule

ARCHITECTURE = "LlavaNextForConditionalGeneration"
NEWLINE_KEYS = ("model.image_newline", "image_newline")


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    cfg = llava.translate_config(hf_cfg, model_name=model_name)
    pinpoints = [list(p) for p in hf_cfg.image_grid_pinpoints]
    return cfg.replace(original_architecture=ARCHITECTURE,
                       extra={**cfg.extra, "image_pipeline": "anyres", "image_grid_pinpoints": pinpoints})


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    rules, ignore = llava.conversion_rules(cfg, source, tie_word_embeddings)
    newline = next((k for k in NEWLINE_KEYS if k in source), NEWLINE_KEYS[0])
    return rules + [(Rule("anyres.image_newline", newline), {})], ignore
