"""LLaVA-1.5 layout (Hugging Face ``LlavaForConditionalGeneration``): CLIP ViT tower,
mlp2x_gelu or linear projector, Llama-family text tower (Llama, Mistral, Qwen2, Qwen3 with its q/k norms, Phi,
Phi-3, Gemma).

Config translation plus key tables; the loading itself is :func:`common.load_strict`.
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from mm_lens.config import ProjectorConfig, VisionConfig, VLMConfig
from mm_lens.conversion import gemma, phi, phi3, siglip
from mm_lens.conversion.common import (
    ZERO,
    Rule,
    attention_rules,
    expand,
    sliding_window,
    transpose,
    vit_encoder_layer_rules,
)

ARCHITECTURE = "LlavaForConditionalGeneration"
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma")
QK_NORM_TEXT_MODEL_TYPES = ("qwen3",)  # RMSNorm on each head's queries and keys before rotary
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")

# ---------------------------------------------------------------- key tables (relative to each tower's prefix)
CLIP_VISION = [
    Rule("W_patch", "embeddings.patch_embedding.weight"),
    Rule("cls_token", "embeddings.class_embedding"),
    Rule("W_pos", "embeddings.position_embedding.weight"),
    Rule("ln_pre.w", "pre_layrnorm.weight"),
    Rule("ln_pre.b", "pre_layrnorm.bias"),
    *vit_encoder_layer_rules(),
    Rule("ln_post.w", "post_layernorm.weight"),
    Rule("ln_post.b", "post_layernorm.bias"),
]


def llama_text(attn_bias: bool, mlp_bias: bool, o_bias: Optional[bool] = None) -> list[Rule]:
    """Llama / Vicuna / Mistral / Qwen2 / Qwen3 (grouped-query attention included; Qwen2: q/k/v biases, none on o;
    Qwen3 adds :data:`QK_NORM`)."""
    o_bias = attn_bias if o_bias is None else o_bias
    a = "layers.{l}.self_attn."
    m = "layers.{l}.mlp."
    return [
        Rule("embed.W_E", "embed_tokens.weight"),
        Rule("blocks.{l}.ln1.w", "layers.{l}.input_layernorm.weight"),
        *attention_rules(a, out="o_proj", bias=attn_bias, out_bias=o_bias),
        Rule("blocks.{l}.ln2.w", "layers.{l}.post_attention_layernorm.weight"),
        Rule("blocks.{l}.mlp.W_gate", m + "gate_proj.weight", transpose),
        Rule("blocks.{l}.mlp.W_in", m + "up_proj.weight", transpose),
        Rule("blocks.{l}.mlp.W_out", m + "down_proj.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", m + "up_proj.bias" if mlp_bias else ZERO),
        Rule("blocks.{l}.mlp.b_out", m + "down_proj.bias" if mlp_bias else ZERO),
        Rule("ln_final.w", "norm.weight"),
    ]


# Qwen3's per-head RMSNorms on queries and keys (Qwen3, Qwen3-VL), keys as ``llama_text``'s
QK_NORM = [Rule("blocks.{l}.attn.q_norm.w", "layers.{l}.self_attn.q_norm.weight"),
           Rule("blocks.{l}.attn.k_norm.w", "layers.{l}.self_attn.k_norm.weight")]


def projector(kind: str, bias: bool) -> list[Rule]:
    rules = [Rule("W_in", "linear_1.weight", transpose), Rule("b_in", "linear_1.bias" if bias else ZERO)]
    if kind == "mlp2x_gelu":
        rules += [Rule("W_out", "linear_2.weight", transpose), Rule("b_out", "linear_2.bias" if bias else ZERO)]
    return rules


# where each tower sits, across transformers versions
VISION_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_tower.")
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.language_model.model.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
# buffers older checkpoints saved beside the weights (Llama's rotary frequencies, CLIP's position ids):
# recomputed from the config, never weights, so skipped by name
KNOWN_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")


def find_prefix(source: Mapping[str, Tensor], candidates, probe: str, what: str) -> str:
    for prefix in candidates:
        if prefix + probe in source:
            return prefix
    raise ValueError(f"no {what} weights found: looked for {[c + probe for c in candidates]}")


# ---------------------------------------------------------------- config translation
def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def rope_base(text_cfg) -> float:
    params = getattr(text_cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", _get(text_cfg, "rope_theta", default=10000.0)))


def rotary_frequencies(text_cfg) -> Optional[tuple[Tensor, float]]:
    """``(inv_freq, attention_scaling)`` of the text tower's rotary embedding, from its config by transformers'
    own rope initialisation (linear, dynamic, yarn, llama3, longrope, ...); None for the default rope, which
    :class:`mm_lens.components.Rotary` computes itself."""
    params = getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](text_cfg, device="cpu")
    return inv_freq, float(scaling)


def translate_vision_config(vc) -> VisionConfig:
    if vc.model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"unsupported vision tower {vc.model_type!r} for {ARCHITECTURE}; supported: {VISION_MODEL_TYPES}")
    if vc.model_type == siglip.MODEL_TYPE:
        return siglip.translate_vision_config(vc)
    return VisionConfig(
        d_model=vc.hidden_size, n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size, image_size=vc.image_size, patch_size=vc.patch_size,
        n_channels=vc.num_channels, act_fn=vc.hidden_act, eps=vc.layer_norm_eps,
    )


def translate_text_config(tc, **fields) -> dict:
    if tc.model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"unsupported text tower {tc.model_type!r} for {ARCHITECTURE}; supported: {TEXT_MODEL_TYPES}")
    if tc.model_type in ("phi", "phi3"):
        return {**(phi if tc.model_type == "phi" else phi3).translate_text_config(tc), **fields}
    if getattr(tc, "mlp_bias", False):
        raise ValueError("Llama MLPs with biases (mlp_bias=True) are not supported: the gate bias has no TL slot")
    n_heads = tc.num_attention_heads
    return dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads,
        d_head=_get(tc, "head_dim", default=tc.hidden_size // n_heads), d_mlp=tc.intermediate_size,
        d_vocab=tc.vocab_size, n_key_value_heads=_get(tc, "num_key_value_heads", default=n_heads),
        n_ctx=tc.max_position_embeddings, act_fn=tc.hidden_act, normalization_type="RMS", eps=tc.rms_norm_eps,
        gated_mlp=True, attn_bias=tc.model_type == "qwen2" or bool(getattr(tc, "attention_bias", False)),
        positional_embedding_type="rotary", rotary_base=rope_base(tc),
        use_qk_norm=tc.model_type in QK_NORM_TEXT_MODEL_TYPES, extra=dict(text_model_type=tc.model_type),
        **sliding_window(tc), **fields,
    )


def text_rules(cfg: VLMConfig) -> list[Rule]:
    """The text tower's key table (relative to its prefix), by ``extra['text_model_type']``."""
    kind = cfg.extra.get("text_model_type", "llama")
    if kind in ("phi", "phi3"):
        return (phi if kind == "phi" else phi3).text_rules(cfg)
    rules = llama_text(cfg.attn_bias, cfg.mlp_bias, o_bias=False if kind == "qwen2" else None)
    if kind in QK_NORM_TEXT_MODEL_TYPES:
        rules += QK_NORM
    return gemma.text_rules(cfg, rules) if kind == "gemma" else rules


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    vision = translate_vision_config(hf_cfg.vision_config)
    layers = hf_cfg.vision_feature_layer
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)
    tc = hf_cfg.text_config
    proj = ProjectorConfig(
        kind="mlp2x_gelu", d_in=vision.d_model * n_feature_layers, d_out=tc.hidden_size,
        act_fn=hf_cfg.projector_hidden_act, bias=bool(getattr(hf_cfg, "multimodal_projector_bias", True)),
    )
    return VLMConfig(**translate_text_config(
        tc, original_architecture=ARCHITECTURE, model_name=model_name, vision=vision, projector=proj,
        vision_feature_layer=layers if isinstance(layers, int) else tuple(layers),
        vision_feature_select_strategy=hf_cfg.vision_feature_select_strategy,
        image_token_id=_get(hf_cfg, "image_token_id", "image_token_index"), pad_token_id=tc.pad_token_id,
    ))


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    """``(rule, dims)`` pairs for every HookedVLM parameter, plus the source keys to ignore."""
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    vision_dims = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    vp = find_prefix(source, VISION_PREFIXES, "embeddings.patch_embedding.weight", "vision tower")
    tp = find_prefix(source, TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    pp = find_prefix(source, PROJECTOR_PREFIXES, "linear_1.weight", "projector")
    vision_table = siglip.SIGLIP_VISION if cfg.vision.architecture == "siglip" else CLIP_VISION
    rules = [(r, vision_dims) for r in expand(vision_table, cfg.vision.n_layers, "vision_encoder.", vp)]
    rules += [(r, text_dims) for r in expand(text_rules(cfg), cfg.n_layers, "", tp)]
    rules += [(r, {}) for r in expand(projector(cfg.projector.kind, cfg.projector.bias), 0, "vision_projector.", pp)]
    head = next((k for k in LM_HEAD_KEYS if k in source), None)
    if head is None and tie_word_embeddings:
        head = tp + "embed_tokens.weight"
    head = head or LM_HEAD_KEYS[0]
    head_bias = ZERO
    if cfg.extra.get("text_model_type") == "phi":  # PhiForCausalLM's lm_head has a bias; Llava's own head has none
        biases = [k[: -len("weight")] + "bias" for k in LM_HEAD_KEYS]
        head_bias = next((k for k in biases if k in source), ZERO)
    rules += [(Rule("unembed.W_U", head, transpose), {}), (Rule("unembed.b_U", head_bias), {})]
    ignore = [k for k in source if k.endswith(KNOWN_BUFFERS)]
    return rules, ignore + (siglip.skipped_keys(source, vp) if cfg.vision.architecture == "siglip" else [])
