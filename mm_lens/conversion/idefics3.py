"""Idefics3 (Hugging Face ``Idefics3ForConditionalGeneration``): a SigLIP tower with NaViT-style positions, the
pixel-shuffle connector (``scale_factor``) with a linear map, and a Llama-family language model. SmolVLM
(:mod:`.smolvlm`) is the same model under another name.

Config translation plus key tables. The vision tower's keys are SigLIP's (:mod:`.siglip`), the text tower's
LLaVA's (:mod:`.llava`); the connector is ``connector.modality_projection.proj`` (no bias). The image handling is
:mod:`mm_lens.components.idefics_pipeline`. The Hugging Face layout is the only one these checkpoints are
published in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from torch import Tensor

from mm_lens.config import ProjectorConfig, VLMConfig
from mm_lens.conversion import llava, siglip
from mm_lens.conversion.common import ZERO, Rule, expand, transpose

ARCHITECTURE = "Idefics3ForConditionalGeneration"
MODEL_TYPE = "idefics3"
VISION_PREFIXES = ("model.vision_model.", "vision_model.")
TEXT_PREFIXES = ("model.text_model.", "text_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")
CONNECTOR = [Rule("W_in", "modality_projection.proj.weight", transpose)]


def check_text_tower(tc, architecture: str) -> None:
    if tc.model_type not in llava.TEXT_MODEL_TYPES:
        raise ValueError(f"unsupported text tower {tc.model_type!r} for {architecture}; supported: "
                         f"{llava.TEXT_MODEL_TYPES}")


def translate_config(hf_cfg, model_name: str = "custom", architecture: str = ARCHITECTURE) -> VLMConfig:
    tc, scale = hf_cfg.text_config, int(hf_cfg.scale_factor)
    check_text_tower(tc, architecture)
    vision = siglip.translate_vision_config(hf_cfg.vision_config)
    if vision.grid_size % scale:
        raise ValueError(f"scale_factor {scale} must divide the {vision.grid_size}x{vision.grid_size} patch grid")
    projector = ProjectorConfig(kind="pixel_shuffle", d_in=vision.d_model * scale**2, d_out=tc.hidden_size, bias=False,
                                tokens_per_side=vision.grid_size // scale)
    cfg = VLMConfig(**llava.translate_text_config(
        tc, original_architecture=architecture, model_name=model_name,
        vision=replace(vision, architecture="idefics3_vision"), projector=projector,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_id=hf_cfg.image_token_id,
        pad_token_id=tc.pad_token_id))
    return cfg.replace(extra={**cfg.extra, "image_pipeline": "idefics3", "pixel_shuffle": scale})


def lm_head(source: Mapping[str, Tensor], text_prefix: str, tie_word_embeddings: bool) -> str:
    """The unembedding's key: ``lm_head.weight``, or the embedding when the config ties them and it is absent."""
    if "lm_head.weight" in source or not tie_word_embeddings:
        return "lm_head.weight"
    return text_prefix + "embed_tokens.weight"


def conversion_rules(cfg: VLMConfig, source: Mapping[str, Tensor], tie_word_embeddings: bool = False):
    """``(rule, dims)`` pairs for every HookedVLM parameter, plus the source keys to ignore."""
    vp = llava.find_prefix(source, VISION_PREFIXES, "embeddings.patch_embedding.weight", "vision tower")
    tp = llava.find_prefix(source, TEXT_PREFIXES, "embed_tokens.weight", "text tower")
    cp = llava.find_prefix(source, CONNECTOR_PREFIXES, "modality_projection.proj.weight", "connector")
    vision_dims = dict(n_heads=cfg.vision.n_heads, n_kv_heads=cfg.vision.n_heads)
    text_dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads)
    rules = [(r, vision_dims) for r in expand(siglip.SIGLIP_VISION, cfg.vision.n_layers, "vision_encoder.", vp)]
    rules += [(r, text_dims) for r in expand(llava.text_rules(cfg), cfg.n_layers, "", tp)]
    rules += [(r, {}) for r in expand(CONNECTOR, 0, "vision_projector.", cp)]
    rules += [(Rule("unembed.W_U", lm_head(source, tp, tie_word_embeddings), transpose), {}),
              (Rule("unembed.b_U", ZERO), {})]
    return rules, [k for k in source if k.endswith(llava.KNOWN_BUFFERS)]
