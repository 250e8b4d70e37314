"""SigLIP vision tower (Hugging Face ``SiglipVisionModel``, model_type ``siglip_vision_model``).

Unlike CLIP: no class token, a patch embedding with bias, no pre-LayerNorm, and
``post_layernorm`` applied to every position (``last_hidden_state``). The attention-pooling
``head`` does not feed a VLM's projector; its keys are skipped by name (and listed in
:data:`SKIPPED_PREFIXES`), every other key must be used.
"""

from __future__ import annotations

from mm_lens.config import VisionConfig
from mm_lens.conversion.common import (
    Rule, split_heads_bias, split_heads_in, split_heads_out, split_kv_heads_bias, split_kv_heads_in, transpose,
)

MODEL_TYPE = "siglip_vision_model"
SKIPPED_PREFIXES = ("head.",)  # attention-pooling head (image-text contrastive objective only)


def translate_vision_config(vc) -> VisionConfig:
    return VisionConfig(
        d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size, image_size=vc.image_size, patch_size=vc.patch_size,
        n_channels=vc.num_channels, act_fn=vc.hidden_act, eps=vc.layer_norm_eps,
        has_cls_token=False, has_ln_pre=False, has_ln_post=True, patch_bias=True, architecture="siglip",
    )


def _layer_rules() -> list[Rule]:
    e = "encoder.layers.{l}."
    a = e + "self_attn."
    return [
        Rule("blocks.{l}.ln1.w", e + "layer_norm1.weight"),
        Rule("blocks.{l}.ln1.b", e + "layer_norm1.bias"),
        Rule("blocks.{l}.attn.W_Q", a + "q_proj.weight", split_heads_in),
        Rule("blocks.{l}.attn.b_Q", a + "q_proj.bias", split_heads_bias),
        Rule("blocks.{l}.attn._W_K", a + "k_proj.weight", split_kv_heads_in),
        Rule("blocks.{l}.attn._b_K", a + "k_proj.bias", split_kv_heads_bias),
        Rule("blocks.{l}.attn._W_V", a + "v_proj.weight", split_kv_heads_in),
        Rule("blocks.{l}.attn._b_V", a + "v_proj.bias", split_kv_heads_bias),
        Rule("blocks.{l}.attn.W_O", a + "out_proj.weight", split_heads_out),
        Rule("blocks.{l}.attn.b_O", a + "out_proj.bias"),
        Rule("blocks.{l}.ln2.w", e + "layer_norm2.weight"),
        Rule("blocks.{l}.ln2.b", e + "layer_norm2.bias"),
        Rule("blocks.{l}.mlp.W_in", e + "mlp.fc1.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", e + "mlp.fc1.bias"),
        Rule("blocks.{l}.mlp.W_out", e + "mlp.fc2.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", e + "mlp.fc2.bias"),
    ]


SIGLIP_VISION = [
    Rule("W_patch", "embeddings.patch_embedding.weight"),
    Rule("b_patch", "embeddings.patch_embedding.bias"),
    Rule("W_pos", "embeddings.position_embedding.weight"),
    *_layer_rules(),
    Rule("ln_post.w", "post_layernorm.weight"),
    Rule("ln_post.b", "post_layernorm.bias"),
]


def skipped_keys(source, prefix: str) -> list[str]:
    """Source keys of the pooling head under ``prefix`` (not part of the hooked tower)."""
    return [k for k in source if any(k.startswith(prefix + p) for p in SKIPPED_PREFIXES)]
