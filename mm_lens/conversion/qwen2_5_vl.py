"""Qwen2.5-VL (Hugging Face ``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's design with RMSNorm and a
SwiGLU MLP (biases on gate, up and down) in the vision tower, attention inside windows of ``window_size``
pixels except at ``fullatt_block_indexes``, and an RMSNorm ``ln_q`` in the merger. The text tower, the
M-RoPE positions and the key layouts are Qwen2-VL's (:mod:`.qwen2_vl`).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mm_lens.components.qwen_vision import QwenVisionConfig
from mm_lens.config import VLMConfig
from mm_lens.conversion.common import Rule, transpose
from mm_lens.conversion.qwen2_vl import (
    norm_rules,
    qwen_rules,
    qwen_vision_config,
    translate_text_config,
    vision_attention_rules,
)

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"

VISION = [  # RMSNorms, SwiGLU MLP with biases
    Rule("W_patch", "patch_embed.proj.weight"),
    *norm_rules("blocks.{l}.ln1", "blocks.{l}.norm1", False),
    *vision_attention_rules("blocks.{l}.attn."),
    *norm_rules("blocks.{l}.ln2", "blocks.{l}.norm2", False),
    Rule("blocks.{l}.mlp.W_gate", "blocks.{l}.mlp.gate_proj.weight", transpose),
    Rule("blocks.{l}.mlp.b_gate", "blocks.{l}.mlp.gate_proj.bias"),
    Rule("blocks.{l}.mlp.W_in", "blocks.{l}.mlp.up_proj.weight", transpose),
    Rule("blocks.{l}.mlp.b_in", "blocks.{l}.mlp.up_proj.bias"),
    Rule("blocks.{l}.mlp.W_out", "blocks.{l}.mlp.down_proj.weight", transpose),
    Rule("blocks.{l}.mlp.b_out", "blocks.{l}.mlp.down_proj.bias"),
]


def translate_vision_config(vc) -> QwenVisionConfig:
    return qwen_vision_config(vc, MODEL_TYPE, vc.hidden_size, vc.intermediate_size, normalization_type="RMS",
                              window_size=vc.window_size, full_attention_layers=tuple(vc.fullatt_block_indexes),
                              gated_mlp=True)


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    vc = hf_cfg.vision_config
    return translate_text_config(hf_cfg, ARCHITECTURE, model_name, translate_vision_config(vc), vc.out_hidden_size)


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    return qwen_rules(cfg, source, VISION, tie_word_embeddings)
