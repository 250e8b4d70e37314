"""SmolVLM / SmolVLM2 (Hugging Face ``SmolVLMForConditionalGeneration``): Idefics3's model (:mod:`.idefics3`) under
another name, with SmolLM2 (Llama) language models and ``SmolVLMProcessor`` inputs (the same image splitting and
marker tokens; videos are not supported). Published only in the Hugging Face layout.
"""

from __future__ import annotations

from mm_lens.config import VLMConfig
from mm_lens.conversion import idefics3

ARCHITECTURE = "SmolVLMForConditionalGeneration"
MODEL_TYPE = "smolvlm"


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    return idefics3.translate_config(hf_cfg, model_name, architecture=ARCHITECTURE)


conversion_rules = idefics3.conversion_rules
