"""Qwen3-VL (Hugging Face ``Qwen3VLForConditionalGeneration``): Qwen2-VL's design (:mod:`.qwen2_vl`) with

* a vision tower whose patch embedding has a bias, with learned position embeddings resized to each image's
  grid, LayerNorm blocks with a plain MLP (``linear_fc1``, ``linear_fc2``), 2-D rotary and no windows;
* a patch merger (``merger``: LayerNorm, linear, GELU, linear) as projector, and one DeepStack merger per
  ``deepstack_visual_indexes`` layer (``deepstack_merger_list``: LayerNorm after the 2x2 concatenation), whose
  features are added at the image positions after the language model's first ``k`` blocks
  (``blocks.{l}.hook_visual_in``; :mod:`mm_lens.components.qwen_pipeline`);
* a Qwen3 language model: RMSNorm on each head's queries and keys before rotary (``attn.q_norm``/``k_norm``),
  no attention biases, ``head_dim`` of its own, and interleaved M-RoPE (:class:`mm_lens.components.Rotary`).

Keys sit at ``model.visual.*`` and ``model.language_model.*`` (the layout Qwen3-VL checkpoints are published in).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mm_lens.components.qwen_vision import QwenVisionConfig
from mm_lens.config import ProjectorConfig, VLMConfig
from mm_lens.conversion import llava
from mm_lens.conversion.common import ZERO, Rule, expand, transpose
from mm_lens.conversion.qwen2_vl import (
    TEXT_PREFIXES,
    VISION_PREFIXES,
    norm_rules,
    qwen_vision_config,
    vision_attention_rules,
)

ARCHITECTURE = "Qwen3VLForConditionalGeneration"
MODEL_TYPE = "qwen3_vl"

VISION = [  # patch bias, learned positions, LayerNorms, linear_fc1 / linear_fc2 MLP
    Rule("W_patch", "patch_embed.proj.weight"),
    Rule("b_patch", "patch_embed.proj.bias"),
    Rule("W_pos", "pos_embed.weight"),
    *norm_rules("blocks.{l}.ln1", "blocks.{l}.norm1", True),
    *vision_attention_rules("blocks.{l}.attn."),
    *norm_rules("blocks.{l}.ln2", "blocks.{l}.norm2", True),
    Rule("blocks.{l}.mlp.W_in", "blocks.{l}.mlp.linear_fc1.weight", transpose),
    Rule("blocks.{l}.mlp.b_in", "blocks.{l}.mlp.linear_fc1.bias"),
    Rule("blocks.{l}.mlp.W_out", "blocks.{l}.mlp.linear_fc2.weight", transpose),
    Rule("blocks.{l}.mlp.b_out", "blocks.{l}.mlp.linear_fc2.bias"),
]

MERGER = [  # the projector and each DeepStack merger (``{l}``: the merger's index)
    *norm_rules("ln_q", "norm", True),
    Rule("W_in", "linear_fc1.weight", transpose),
    Rule("b_in", "linear_fc1.bias"),
    Rule("W_out", "linear_fc2.weight", transpose),
    Rule("b_out", "linear_fc2.bias"),
]

def translate_vision_config(vc) -> QwenVisionConfig:
    return qwen_vision_config(vc, MODEL_TYPE, vc.hidden_size, vc.intermediate_size, normalization_type="LN",
                              n_position_embeddings=vc.num_position_embeddings, patch_bias=True,
                              deepstack_layers=tuple(int(l) for l in vc.deepstack_visual_indexes))


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    """The Qwen3 language model with interleaved M-RoPE and DeepStack, and what the image pipeline reads."""
    tc, vc = hf_cfg.text_config, hf_cfg.vision_config
    vision = translate_vision_config(vc)
    params = getattr(tc, "rope_parameters", None) or {}
    section = params.get("mrope_section")
    if not section:
        raise ValueError(f"this {ARCHITECTURE} text config has no rope_parameters['mrope_section']: M-RoPE needs it")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {params['rope_type']!r}: mm_lens reads Qwen3-VL's default (M-RoPE) rotary only")
    if len(vision.deepstack_layers) > tc.num_hidden_layers:
        raise ValueError(f"{len(vision.deepstack_layers)} DeepStack layers but {tc.num_hidden_layers} text layers")
    n_heads, m2 = tc.num_attention_heads, vision.spatial_merge_size**2
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return VLMConfig(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads, d_head=d_head,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size, n_key_value_heads=tc.num_key_value_heads or n_heads,
        n_ctx=tc.max_position_embeddings, act_fn=tc.hidden_act, normalization_type="RMS", eps=tc.rms_norm_eps,
        gated_mlp=True, attn_bias=bool(tc.attention_bias), positional_embedding_type="rotary",
        rotary_base=llava.rope_base(tc), use_qk_norm=True, original_architecture=ARCHITECTURE, model_name=model_name,
        vision=vision, projector=ProjectorConfig(kind="patch_merger", d_in=vision.d_model * m2, d_out=vc.out_hidden_size,
                                                 act_fn="gelu"),
        vision_feature_layer=-1, image_token_id=hf_cfg.image_token_id, pad_token_id=tc.pad_token_id,
        extra=dict(text_model_type="qwen3", image_pipeline="qwen3_vl", mrope_section=[int(s) for s in section],
                   mrope_interleaved=True, deepstack_layers=len(vision.deepstack_layers),
                   image_start_token_id=hf_cfg.vision_start_token_id, image_end_token_id=hf_cfg.vision_end_token_id,
                   video_token_id=getattr(hf_cfg, "video_token_id", None)),
    )


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    """``(rule, dims)`` pairs for every parameter (vision tower, projector, DeepStack mergers, text tower, head)."""
    vp = llava.find_prefix(source, VISION_PREFIXES, "patch_embed.proj.weight", "vision tower")
    tp = llava.find_prefix(source, TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    vision_dims = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    rules = [(r, vision_dims) for r in expand(VISION, cfg.vision.n_layers, "vision_encoder.", vp)]
    rules += [(r, {}) for r in expand(MERGER, 0, "vision_projector.", vp + "merger.")]
    for j in range(len(cfg.vision.deepstack_layers)):
        rules += [(r, {}) for r in expand(MERGER, 0, f"deepstack_mergers.{j}.", f"{vp}deepstack_merger_list.{j}.")]
    text = llava.llama_text(attn_bias=cfg.attn_bias, mlp_bias=False, o_bias=cfg.attn_bias) + llava.QK_NORM
    rules += [(r, text_dims) for r in expand(text, cfg.n_layers, "", tp)]
    head = "lm_head.weight" if "lm_head.weight" in source or not tie_word_embeddings else tp + "embed_tokens.weight"
    rules += [(Rule("unembed.W_U", head, transpose), {}), (Rule("unembed.b_U", ZERO), {})]
    return rules, [k for k in source if k.endswith(llava.KNOWN_BUFFERS)]
