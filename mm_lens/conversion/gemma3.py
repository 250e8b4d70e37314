"""Gemma 3 (Hugging Face ``Gemma3ForConditionalGeneration``): SigLIP tower, pooled soft tokens, Gemma 3 text tower.

* Vision: SigLIP (:mod:`siglip`); the projector reads the tower's output (``last_hidden_state``, its
  ``post_layernorm`` included).
* Projector (:class:`mm_lens.components.projector.PooledProjector`): the patch grid average-pooled to
  ``mm_tokens_per_image`` soft tokens, RMSNorm (``mm_soft_emb_norm``), ``mm_input_projection_weight``
  (stored ``[d_vision, d_model]``, already TransformerLens' ``[in, out]``).
* Text: Gemma's scaled embedding and ``1 + w`` norms (absorbed into the weights, :mod:`gemma`), RMSNorm on
  each head's queries and keys (``attn.q_norm``/``attn.k_norm``), sandwich norms (Hugging Face's
  ``post_attention_layernorm`` is ``ln1_post``, ``pre_feedforward_layernorm`` is ``ln2`` and
  ``post_feedforward_layernorm`` is ``ln2_post``), scores scaled by ``query_pre_attn_scalar ** -0.5``, local
  (sliding-window) layers with a rotary base of their own. Like Hugging Face's ``Gemma3ForConditionalGeneration``,
  no softcapping (the config's ``attn_logit_softcapping`` and ``final_logit_softcapping`` are not applied there;
  the published checkpoints set neither).
* Inputs: the processor writes each image as ``<start_of_image>`` + soft tokens + ``<end_of_image>``; the
  soft tokens of one image attend to each other (bidirectional image groups); pan-and-scan crops, when the
  image processor makes them, are laid out by the image pipeline of :mod:`mm_lens.components.pan_and_scan`.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

from torch import Tensor

from mm_lens.config import ProjectorConfig, VLMConfig
from mm_lens.conversion import siglip
from mm_lens.conversion.common import ZERO, Rule, attention_rules, expand, sliding_window, transpose
from mm_lens.conversion.gemma import plus_one, scaled_by
from mm_lens.conversion.llava import LM_HEAD_KEYS, PROJECTOR_PREFIXES, TEXT_PREFIXES, VISION_PREFIXES, find_prefix

ARCHITECTURE = "Gemma3ForConditionalGeneration"
MODEL_TYPE = "gemma3"
TEXT_MODEL_TYPE = "gemma3_text"


def _rope(tc, layer_type: str) -> dict:
    params = getattr(tc, "rope_parameters", None) or {}
    if layer_type not in params:
        raise ValueError(f"this Gemma 3 config has no rope parameters for {layer_type!r} layers")
    return params[layer_type]


def rotary_frequencies(text_cfg) -> Optional[tuple[Tensor, float]]:
    """The global layers' rotary frequencies (scaled rope included, as transformers initialises them); None for
    the default rope. The local layers always use the default rope (checked in :func:`translate_config`)."""
    params = _rope(text_cfg, "full_attention")
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](text_cfg, device="cpu", layer_type="full_attention")
    return inv_freq, float(scaling)


def translate_config(hf_cfg, model_name: str = "custom") -> VLMConfig:
    tc, vc = hf_cfg.text_config, hf_cfg.vision_config
    if tc.model_type != TEXT_MODEL_TYPE:
        raise ValueError(f"unsupported text tower {tc.model_type!r} for {ARCHITECTURE}; supported: {TEXT_MODEL_TYPE}")
    if vc.model_type != siglip.MODEL_TYPE:
        raise ValueError(f"unsupported vision tower {vc.model_type!r} for {ARCHITECTURE}; supported: {siglip.MODEL_TYPE}")
    if getattr(tc, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 text towers with use_bidirectional_attention (embedding models) are not supported")
    if tc.attn_logit_softcapping or tc.final_logit_softcapping:
        warnings.warn("this Gemma 3 config sets attn_logit_softcapping / final_logit_softcapping, which Hugging Face's "
                      "Gemma3ForConditionalGeneration does not apply; neither does mm_lens (its output stays the "
                      "checkpoint's)", stacklevel=3)
    local = _rope(tc, "sliding_attention")
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"a {local['rope_type']!r} rope on the local layers is not supported (only the default)")
    vision = siglip.translate_vision_config(vc)
    tokens_per_side = math.isqrt(hf_cfg.mm_tokens_per_image)
    if tokens_per_side**2 != hf_cfg.mm_tokens_per_image or vision.grid_size % tokens_per_side:
        raise ValueError(f"mm_tokens_per_image={hf_cfg.mm_tokens_per_image} must be a square whose side divides the "
                         f"{vision.grid_size}x{vision.grid_size} patch grid")
    projector = ProjectorConfig(kind="pooled", d_in=vision.d_model, d_out=tc.hidden_size, bias=False,
                                tokens_per_side=tokens_per_side, eps=vc.layer_norm_eps)
    n_heads = tc.num_attention_heads
    return VLMConfig(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads, d_head=tc.head_dim,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size, n_key_value_heads=tc.num_key_value_heads,
        n_ctx=tc.max_position_embeddings, act_fn=tc.hidden_activation, normalization_type="RMS", eps=tc.rms_norm_eps,
        gated_mlp=True, attn_bias=bool(tc.attention_bias), positional_embedding_type="rotary",
        rotary_base=float(_rope(tc, "full_attention")["rope_theta"]), rotary_base_local=float(local["rope_theta"]),
        use_qk_norm=True, use_normalization_before_and_after=True, attn_scale=float(tc.query_pre_attn_scalar) ** 0.5,
        **sliding_window(tc),
        original_architecture=ARCHITECTURE, model_name=model_name, vision=vision, projector=projector,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_id=hf_cfg.image_token_id,
        bidirectional_image_attention=True, pad_token_id=tc.pad_token_id,
        extra=dict(text_model_type=TEXT_MODEL_TYPE, image_pipeline="pan_and_scan",
                   image_start_token_id=hf_cfg.boi_token_id, image_end_token_id=hf_cfg.eoi_token_id),
    )


def text_rules(cfg: VLMConfig) -> list[Rule]:
    """The Gemma 3 text tower's key table (relative to its prefix)."""
    a, m, layer = "layers.{l}.self_attn.", "layers.{l}.mlp.", "layers.{l}."
    return [
        Rule("embed.W_E", "embed_tokens.weight", scaled_by(math.sqrt(cfg.d_model))),
        Rule("blocks.{l}.ln1.w", layer + "input_layernorm.weight", plus_one),
        *attention_rules(a, out="o_proj", bias=cfg.attn_bias),
        Rule("blocks.{l}.attn.q_norm.w", a + "q_norm.weight", plus_one),
        Rule("blocks.{l}.attn.k_norm.w", a + "k_norm.weight", plus_one),
        Rule("blocks.{l}.ln1_post.w", layer + "post_attention_layernorm.weight", plus_one),
        Rule("blocks.{l}.ln2.w", layer + "pre_feedforward_layernorm.weight", plus_one),
        Rule("blocks.{l}.ln2_post.w", layer + "post_feedforward_layernorm.weight", plus_one),
        Rule("blocks.{l}.mlp.W_gate", m + "gate_proj.weight", transpose),
        Rule("blocks.{l}.mlp.W_in", m + "up_proj.weight", transpose),
        Rule("blocks.{l}.mlp.W_out", m + "down_proj.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", ZERO),
        Rule("blocks.{l}.mlp.b_out", ZERO),
        Rule("ln_final.w", "norm.weight", plus_one),
    ]


PROJECTOR = [
    Rule("W_in", "mm_input_projection_weight"),
    Rule("norm.w", "mm_soft_emb_norm.weight", plus_one),
]


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    """``(rule, dims)`` pairs for every HookedVLM parameter, plus the source keys to ignore."""
    vp = find_prefix(source, VISION_PREFIXES, "embeddings.patch_embedding.weight", "vision tower")
    tp = find_prefix(source, TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    pp = find_prefix(source, PROJECTOR_PREFIXES, "mm_input_projection_weight", "projector")
    vision_dims = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    rules = [(r, vision_dims) for r in expand(siglip.SIGLIP_VISION, cfg.vision.n_layers, "vision_encoder.", vp)]
    rules += [(r, text_dims) for r in expand(text_rules(cfg), cfg.n_layers, "", tp)]
    rules += [(r, {}) for r in expand(PROJECTOR, 0, "vision_projector.", pp)]
    head = next((k for k in LM_HEAD_KEYS if k in source), None)
    if head is None:  # tied (Gemma 3's default): the unscaled embedding matrix
        head = tp + "embed_tokens.weight" if tie_word_embeddings else LM_HEAD_KEYS[0]
    rules += [(Rule("unembed.W_U", head, transpose), {}), (Rule("unembed.b_U", ZERO), {})]
    return rules, siglip.skipped_keys(source, vp)
