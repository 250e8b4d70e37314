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
    translate_text_config,
    vision_attention_rules,
    vision_rope_base,
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
    return QwenVisionConfig(
        d_model=vc.hidden_size, n_layers=vc.depth, n_heads=vc.num_heads, d_mlp=vc.intermediate_size, image_size=0,
        patch_size=vc.patch_size, n_channels=vc.in_channels, act_fn=vc.hidden_act, eps=1e-6, has_cls_token=False,
        has_ln_pre=False, has_ln_post=False, architecture=MODEL_TYPE, normalization_type="RMS",
        temporal_patch_size=vc.temporal_patch_size, spatial_merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, full_attention_layers=tuple(vc.fullatt_block_indexes), gated_mlp=True,
        rope_base=vision_rope_base(vc),
    )


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    vc = hf_cfg.vision_config
    return translate_text_config(hf_cfg, ARCHITECTURE, model_name, translate_vision_config(vc), vc.out_hidden_size)


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    return qwen_rules(cfg, source, VISION, tie_word_embeddings)
