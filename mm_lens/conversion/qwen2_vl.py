"""Qwen2-VL (Hugging Face ``Qwen2VLForConditionalGeneration``): a ViT with a 3-D patch embedding and 2-D
rotary, a 2x2 patch merger as projector, and a Qwen2 language model with M-RoPE.

Config translation plus key tables (Qwen2.5-VL, :mod:`.qwen2_5_vl`, shares the text tower, the merger and
the prefixes). The image handling is :mod:`mm_lens.components.qwen_pipeline`; the tower
:mod:`mm_lens.components.qwen_vision`. Checkpoints saved before transformers 4.52 keep the towers at
``visual.*`` and ``model.*`` (the text tower), later ones at ``model.visual.*`` and ``model.language_model.*``:
both load. The Hugging Face layout is the only one Qwen-VL checkpoints are published in.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mm_lens.components.qwen_vision import QwenVisionConfig
from mm_lens.config import ProjectorConfig, VLMConfig
from mm_lens.conversion import llava
from mm_lens.conversion.common import (
    ZERO,
    Rule,
    expand,
    split_heads_bias,
    split_heads_in,
    split_heads_out,
    transpose,
)

ARCHITECTURE = "Qwen2VLForConditionalGeneration"
MODEL_TYPE = "qwen2_vl"
VISION_PREFIXES = ("model.visual.", "visual.")
TEXT_PREFIXES = ("model.language_model.", "model.")


def qkv(index: int, split):
    """Part ``index`` (q, k, v) of a fused ``qkv`` projection, then ``split`` into heads."""
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        return split(t.chunk(3, dim=0)[index], dims)

    fn.__name__ = f"qkv[{index}]+{split.__name__}"
    return fn


def vision_attention_rules(prefix: str) -> list[Rule]:
    """A fused ``qkv`` (with bias) and the output ``proj`` (with bias) of one vision layer."""
    return [
        Rule("blocks.{l}.attn.W_Q", prefix + "qkv.weight", qkv(0, split_heads_in)),
        Rule("blocks.{l}.attn._W_K", prefix + "qkv.weight", qkv(1, split_heads_in)),
        Rule("blocks.{l}.attn._W_V", prefix + "qkv.weight", qkv(2, split_heads_in)),
        Rule("blocks.{l}.attn.b_Q", prefix + "qkv.bias", qkv(0, split_heads_bias)),
        Rule("blocks.{l}.attn._b_K", prefix + "qkv.bias", qkv(1, split_heads_bias)),
        Rule("blocks.{l}.attn._b_V", prefix + "qkv.bias", qkv(2, split_heads_bias)),
        Rule("blocks.{l}.attn.W_O", prefix + "proj.weight", split_heads_out),
        Rule("blocks.{l}.attn.b_O", prefix + "proj.bias"),
    ]


def norm_rules(target: str, source: str, layer_norm: bool) -> list[Rule]:
    rules = [Rule(target + ".w", source + ".weight")]
    return rules + [Rule(target + ".b", source + ".bias")] if layer_norm else rules


VISION = [  # LayerNorms, quick_gelu MLP (fc1, fc2)
    Rule("W_patch", "patch_embed.proj.weight"),
    *norm_rules("blocks.{l}.ln1", "blocks.{l}.norm1", True),
    *vision_attention_rules("blocks.{l}.attn."),
    *norm_rules("blocks.{l}.ln2", "blocks.{l}.norm2", True),
    Rule("blocks.{l}.mlp.W_in", "blocks.{l}.mlp.fc1.weight", transpose),
    Rule("blocks.{l}.mlp.b_in", "blocks.{l}.mlp.fc1.bias"),
    Rule("blocks.{l}.mlp.W_out", "blocks.{l}.mlp.fc2.weight", transpose),
    Rule("blocks.{l}.mlp.b_out", "blocks.{l}.mlp.fc2.bias"),
]


def merger_rules(layer_norm: bool) -> list[Rule]:
    """``merger.ln_q`` and ``merger.mlp`` (linear, GELU, linear) -> ``vision_projector``."""
    return [
        *norm_rules("ln_q", "merger.ln_q", layer_norm),
        Rule("W_in", "merger.mlp.0.weight", transpose),
        Rule("b_in", "merger.mlp.0.bias"),
        Rule("W_out", "merger.mlp.2.weight", transpose),
        Rule("b_out", "merger.mlp.2.bias"),
    ]


# ---------------------------------------------------------------- config translation
def qwen_vision_config(vc, architecture: str, d_model: int, d_mlp: int, **fields) -> QwenVisionConfig:
    """What every Qwen-VL vision config shares (no class token, no pre/post norms, 3-D patches, 2x2 merges, the
    tower's rotary base); ``fields``: a family's own (norm type, windows, learned positions, DeepStack)."""
    return QwenVisionConfig(
        d_model=d_model, n_layers=vc.depth, n_heads=vc.num_heads, d_mlp=d_mlp, image_size=0, patch_size=vc.patch_size,
        n_channels=vc.in_channels, act_fn=vc.hidden_act, eps=1e-6, has_cls_token=False, has_ln_pre=False,
        has_ln_post=False, architecture=architecture, temporal_patch_size=vc.temporal_patch_size,
        spatial_merge_size=vc.spatial_merge_size, rope_base=vision_rope_base(vc), **fields,
    )


def translate_vision_config(vc) -> QwenVisionConfig:
    return qwen_vision_config(vc, MODEL_TYPE, vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), normalization_type="LN")


def vision_rope_base(vc) -> float:
    return float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


def translate_text_config(hf_cfg, architecture: str, model_name: str, vision: QwenVisionConfig, d_vision_out: int
                          ) -> VLMConfig:
    """The Qwen2 language model with M-RoPE, and what the image pipeline reads (marker and video token ids)."""
    tc = hf_cfg.text_config
    n_heads = tc.num_attention_heads
    params = getattr(tc, "rope_parameters", None) or {}
    section = params.get("mrope_section")
    if not section:
        raise ValueError(f"this {architecture} text config has no rope_parameters['mrope_section']: M-RoPE needs it")
    types = getattr(tc, "layer_types", None) or []
    m2 = vision.spatial_merge_size**2
    return VLMConfig(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads, d_head=tc.hidden_size // n_heads,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size, n_key_value_heads=tc.num_key_value_heads or n_heads,
        n_ctx=tc.max_position_embeddings, act_fn=tc.hidden_act, normalization_type="RMS", eps=tc.rms_norm_eps,
        gated_mlp=True, attn_bias=True, positional_embedding_type="rotary", rotary_base=llava.rope_base(tc),
        original_architecture=architecture, model_name=model_name, vision=vision,
        projector=ProjectorConfig(kind="patch_merger", d_in=vision.d_model * m2, d_out=d_vision_out, act_fn="gelu"),
        vision_feature_layer=-1, image_token_id=hf_cfg.image_token_id, pad_token_id=tc.pad_token_id,
        extra=dict(text_model_type="qwen2", image_pipeline="qwen_vl", mrope_section=[int(s) for s in section],
                   sliding_window=tc.sliding_window if "sliding_attention" in types else None,
                   image_start_token_id=hf_cfg.vision_start_token_id, image_end_token_id=hf_cfg.vision_end_token_id,
                   video_token_id=getattr(hf_cfg, "video_token_id", None)),
    )


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    vc = hf_cfg.vision_config
    return translate_text_config(hf_cfg, ARCHITECTURE, model_name, translate_vision_config(vc), vc.hidden_size)


# ---------------------------------------------------------------- key table
def qwen_rules(cfg: VLMConfig, source: Mapping[str, Tensor], vision_table: list[Rule], tie_word_embeddings: bool):
    """``(rule, dims)`` pairs for every parameter of a Qwen-VL model (either key layout), and no keys to ignore."""
    vp = llava.find_prefix(source, VISION_PREFIXES, "patch_embed.proj.weight", "vision tower")
    tp = llava.find_prefix(source, TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    layer_norm = cfg.vision.normalization_type == "LN"
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    vision_dims = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    rules = [(r, vision_dims) for r in expand(vision_table, cfg.vision.n_layers, "vision_encoder.", vp)]
    rules += [(r, {}) for r in expand(merger_rules(layer_norm), 0, "vision_projector.", vp)]
    rules += [(r, text_dims) for r in expand(llava.llama_text(True, False, o_bias=False), cfg.n_layers, "", tp)]
    head = "lm_head.weight" if "lm_head.weight" in source or not tie_word_embeddings else tp + "embed_tokens.weight"
    rules += [(Rule("unembed.W_U", head, transpose), {}), (Rule("unembed.b_U", ZERO), {})]
    return rules, [k for k in source if k.endswith(llava.KNOWN_BUFFERS)]


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    return qwen_rules(cfg, source, VISION, tie_word_embeddings)
