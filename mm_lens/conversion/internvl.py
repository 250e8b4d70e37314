"""InternVL (Hugging Face ``InternVLForConditionalGeneration``, the ``-hf`` checkpoints): InternViT, a pixel-shuffle
MLP projector (LayerNorm, linear, GELU, linear) and a Qwen2 (InternVL 2.5 / 3), Qwen3 (InternVL3.5: q/k norms) or
other LLaVA-family language model.

Config translation plus key tables. InternViT's layer scales ``lambda_1`` / ``lambda_2`` are folded into the
attention and MLP output weights and biases (:func:`layer_scaled`; the scales are read once, beside the rules);
its q/k norms are RMSNorms over every head at once (:mod:`mm_lens.components.internvl_vision`). The image
handling is :mod:`mm_lens.components.internvl_pipeline`. Only the Hugging Face layout loads: OpenGVLab's original
``InternVLChatModel`` checkpoints (``trust_remote_code``) have ``-hf`` conversions published beside them.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from mm_lens.components.internvl_vision import InternVisionConfig
from mm_lens.config import ProjectorConfig, VLMConfig
from mm_lens.conversion import llava
from mm_lens.conversion.common import ZERO, Rule, attention_rules, expand, transpose
from mm_lens.conversion.idefics3 import check_text_tower, lm_head

ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"
VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
NORMS = {"layer_norm": "LN", "rms_norm": "RMS"}
SKIPPED = ("embeddings.mask_token",)  # masked image modelling only: never read by the VLM
LAYER_SCALED = {"attn.W_O": "lambda_1", "attn.b_O": "lambda_1", "mlp.W_out": "lambda_2", "mlp.b_out": "lambda_2"}


def first(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    """``[1, ...]`` -> ``[...]`` (the class token and position table carry a batch axis)."""
    return t.reshape(t.shape[1:]) if t.shape[0] == 1 else t


def flat(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    return t.reshape(-1)


def layer_scaled(transform):
    """``transform`` then a multiplication of the last axis (``d_model``) by ``dims["layer_scale"]``, in float32."""
    def fn(t: Tensor, dims) -> Tensor:
        out = transform(t, dims)
        scale = dims["layer_scale"]
        return out.float() * scale.to(device=out.device, dtype=torch.float32)

    fn.__name__ = f"{getattr(transform, '__name__', '?')}*layer_scale"
    return fn


def vision_rules(cfg: InternVisionConfig) -> list[Rule]:
    """InternViT's key table (relative to the tower's prefix)."""
    layer, attn, ln = "encoder.layer.{l}.", "encoder.layer.{l}.attention.", cfg.normalization_type == "LN"

    def norm(target: str, source: str, bias: bool) -> list[Rule]:
        return [Rule(target + ".w", source + ".weight")] + ([Rule(target + ".b", source + ".bias")] if bias else [])

    rules = [
        Rule("W_patch", "embeddings.patch_embeddings.projection.weight"),
        Rule("b_patch", "embeddings.patch_embeddings.projection.bias"),
        Rule("cls_token", "embeddings.cls_token", flat),
        Rule("W_pos", "embeddings.position_embeddings", first),
        *norm("blocks.{l}.ln1", layer + "layernorm_before", ln),
        *attention_rules(attn, out="projection_layer", bias=cfg.attention_bias, out_bias=True),
        *norm("blocks.{l}.ln2", layer + "layernorm_after", ln),
        Rule("blocks.{l}.mlp.W_in", layer + "mlp.fc1.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", layer + "mlp.fc1.bias"),
        Rule("blocks.{l}.mlp.W_out", layer + "mlp.fc2.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", layer + "mlp.fc2.bias"),
    ]
    if cfg.qk_norm:
        rules += [Rule("blocks.{l}.attn.q_norm.w", attn + "q_norm.weight"),
                  Rule("blocks.{l}.attn.k_norm.w", attn + "k_norm.weight")]
    return rules + (norm("ln_post", "layernorm", True) if cfg.has_ln_post else [])


PROJECTOR = [
    Rule("ln.w", "layer_norm.weight"),
    Rule("ln.b", "layer_norm.bias"),
    Rule("W_in", "linear_1.weight", transpose),
    Rule("b_in", "linear_1.bias"),
    Rule("W_out", "linear_2.weight", transpose),
    Rule("b_out", "linear_2.bias"),
]


# ---------------------------------------------------------------- config translation
def _square(value, what: str) -> int:
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if values[0] != values[1]:
        raise ValueError(f"only square {what}s are supported, got {values}")
    return int(values[0])


def translate_vision_config(vc) -> InternVisionConfig:
    if vc.norm_type not in NORMS:
        raise ValueError(f"InternViT norm_type {vc.norm_type!r} is not supported; supported: {sorted(NORMS)}")
    if not vc.use_absolute_position_embeddings:
        raise ValueError("InternViT without absolute position embeddings is not supported")
    return InternVisionConfig(
        d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size, image_size=_square(vc.image_size, "image size"),
        patch_size=_square(vc.patch_size, "patch size"), n_channels=vc.num_channels, act_fn=vc.hidden_act,
        eps=vc.layer_norm_eps, has_cls_token=True, has_ln_pre=False, has_ln_post=not vc.use_mean_pooling,
        patch_bias=True, architecture="internvl_vision", normalization_type=NORMS[vc.norm_type],
        qk_norm=bool(vc.use_qk_norm), attention_bias=bool(vc.attention_bias),
    )


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    tc = hf_cfg.text_config
    check_text_tower(tc, ARCHITECTURE)
    vision = translate_vision_config(hf_cfg.vision_config)
    scale = round(1 / hf_cfg.downsample_ratio)
    if abs(scale * hf_cfg.downsample_ratio - 1) > 1e-6 or vision.grid_size % scale:
        raise ValueError(f"downsample_ratio {hf_cfg.downsample_ratio} must be 1/k for a k dividing the "
                         f"{vision.grid_size}x{vision.grid_size} patch grid")
    layer = hf_cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one layer (an int) for {ARCHITECTURE}, got {layer!r}")
    if hf_cfg.vision_feature_select_strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {hf_cfg.vision_feature_select_strategy!r} is not supported "
                         "(the class token would not pixel-shuffle): only 'default'")
    projector = ProjectorConfig(kind="pixel_shuffle_mlp", d_in=vision.d_model * scale**2, d_out=tc.hidden_size,
                                act_fn=hf_cfg.projector_hidden_act, tokens_per_side=vision.grid_size // scale, eps=1e-5)
    cfg = VLMConfig(**llava.translate_text_config(
        tc, original_architecture=ARCHITECTURE, model_name=model_name, vision=vision, projector=projector,
        vision_feature_layer=layer, image_token_id=hf_cfg.image_token_id, pad_token_id=tc.pad_token_id))
    return cfg.replace(extra={**cfg.extra, "image_pipeline": "internvl", "pixel_shuffle": scale})


# ---------------------------------------------------------------- key table
def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    """``(rule, dims)`` pairs for every HookedVLM parameter, plus the source keys to ignore (the layer scales,
    read here and folded in through the output rules' ``dims``)."""
    vp = llava.find_prefix(source, VISION_PREFIXES, "embeddings.cls_token", "vision tower")
    tp = llava.find_prefix(source, llava.TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    pp = llava.find_prefix(source, PROJECTOR_PREFIXES, "linear_1.weight", "projector")
    heads = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    rules, scales = [], []
    for rule in expand(vision_rules(cfg.vision), cfg.vision.n_layers, "vision_encoder.", vp):
        dims, kind = heads, next((k for k in LAYER_SCALED if rule.target.endswith(k)), None)
        if kind is not None:
            layer = rule.target.split(".")[2]
            key = f"{vp}encoder.layer.{layer}.{LAYER_SCALED[kind]}"
            if key not in source:
                raise ValueError(f"cannot convert this {ARCHITECTURE} checkpoint: missing source key {key!r}")
            dims, rule = {**heads, "layer_scale": source[key]}, Rule(rule.target, rule.source, layer_scaled(rule.transform))
            scales.append(key)
        rules.append((rule, dims))
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    rules += [(r, text_dims) for r in expand(llava.text_rules(cfg), cfg.n_layers, "", tp)]
    rules += [(r, {}) for r in expand(PROJECTOR, 0, "vision_projector.", pp)]
    rules += [(Rule("unembed.W_U", lm_head(source, tp, tie_word_embeddings), transpose), {}),
              (Rule("unembed.b_U", ZERO), {})]
    ignore = scales + [k for k in source if k.endswith(llava.KNOWN_BUFFERS + SKIPPED)]
    return rules, ignore
