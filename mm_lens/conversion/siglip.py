"""SigLIP vision tower (Hugging Face ``SiglipVisionModel``, model_type ``siglip_vision_model``).

Unlike CLIP: no class token, a patch embedding with bias, no pre-LayerNorm, and
``post_layernorm`` applied to every position (``last_hidden_state``). The attention-pooling
``head`` does not feed a VLM's projector; its keys are skipped by name (and listed in
:data:`SKIPPED_PREFIXES`), every other key must be used.
"""

from __future__ import annotations

from mm_lens.config import VisionConfig
from mm_lens.conversion.common import Rule, vit_encoder_layer_rules

MODEL_TYPE = "siglip_vision_model"
SKIPPED_PREFIXES = ("head.",)  # attention-pooling head (image-text contrastive objective only)


def translate_vision_config(vc) -> VisionConfig:
    return VisionConfig(
        d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size, image_size=vc.image_size, patch_size=vc.patch_size,
        n_channels=vc.num_channels, act_fn=vc.hidden_act, eps=vc.layer_norm_eps,
        has_cls_token=False, has_ln_pre=False, has_ln_post=True, patch_bias=True, architecture="siglip",
    )


SIGLIP_VISION = [
    Rule("W_patch", "embeddings.patch_embedding.weight"),
    Rule("b_patch", "embeddings.patch_embedding.bias"),
    Rule("W_pos", "embeddings.position_embedding.weight"),
    *vit_encoder_layer_rules(),
    Rule("ln_post.w", "post_layernorm.weight"),
    Rule("ln_post.b", "post_layernorm.bias"),
]


def skipped_keys(source, prefix: str) -> list[str]:
    """Source keys of the pooling head under ``prefix`` (not part of the hooked tower)."""
    return [k for k in source if any(k.startswith(prefix + p) for p in SKIPPED_PREFIXES)]
