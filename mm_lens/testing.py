"""Tiny random Hugging Face vision-language models with a tokenizer made on the spot.

Used by the tests, the benchmarks and the placeholder demo: no download, no hub.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

WORDS = (
    "USER: ASSISTANT: what is the color of shape this a an in on image picture ? . , \n "
    "red green blue yellow purple orange white black circle square triangle star left right top bottom "
    "center yes no there one two three building animal cat dog where which answer few words"
).split(" ")
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]


def make_tokenizer(extra_words: Sequence[str] = (), n_filler: int = 40, padding_side: str = "left",
                   special: Optional[dict] = None):
    """A word-level fast tokenizer (whitespace split) with ``<s>`` prepended and ``<image>`` special.

    ``special``: further special tokens by attribute name, e.g. Gemma 3's ``{"boi_token": "<start_of_image>"}``
    (``image_token`` overrides ``<image>``)."""
    special = {"image_token": "<image>", **(special or {})}
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(list(WORDS) + list(extra_words)) if w and not w.isspace()]
    specials = list(dict.fromkeys(SPECIAL + list(special.values())))
    vocab = {w: i for i, w in enumerate(specials + words + [f"w{i}" for i in range(n_filler)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=special, padding_side=padding_side,
    )
    return tokenizer


def tiny_llava(**kwargs):
    """A random ``LlavaForConditionalGeneration`` (CLIP + Llama) in eval mode and its ``LlavaProcessor``;
    keyword arguments as :func:`tiny_llava_towers`."""
    return tiny_llava_towers("llama", "clip", **kwargs)


@torch.no_grad()
def _spread_init(model: torch.nn.Module, std: float = 0.2) -> None:
    """Random weights of a size that makes every component matter (the default init is nearly silent)."""
    for name, p in model.named_parameters():
        if "norm" in name or "layernorm" in name or "layer_norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.05)
        elif p.ndim >= 2:
            p.normal_(0, std / max(1.0, p.shape[-1] ** 0.5) * 2.5)
        else:
            p.normal_(0, 0.05)


def random_image(seed: int = 0, size: tuple[int, int] = (40, 48)):
    """A random RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- more towers (Phi-2, Mistral, Qwen2; SigLIP)
def tiny_text_config(kind: str, *, vocab_size: int, d_model: int = 48, n_heads: int = 4, n_kv_heads: int = 2,
                     layers: int = 3, d_mlp: Optional[int] = None, tokenizer=None, **overrides):
    """A tiny Hugging Face text config of ``kind``: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi``, ``phi3`` or
    ``gemma``; ``overrides``: further config fields (e.g. ``sliding_window``)."""
    import transformers

    classes = dict(llama="LlamaConfig", mistral="MistralConfig", qwen2="Qwen2Config", qwen3="Qwen3Config", phi="PhiConfig",
                   phi3="Phi3Config", gemma="GemmaConfig")
    if kind not in classes:
        raise ValueError(f"text tower kind must be one of {sorted(classes)}, got {kind!r}")
    fields = dict(hidden_size=d_model, intermediate_size=d_mlp or 2 * d_model, num_hidden_layers=layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab_size,
                  max_position_embeddings=4096)
    if tokenizer is not None:
        fields.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    if kind in ("phi", "phi3"):  # partial rotary: half of each head's dims rotate
        fields.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
    if kind in ("gemma", "qwen3"):  # head_dim different from d_model / n_heads, as in Gemma and Qwen3
        fields.update(head_dim=16)
    return getattr(transformers, classes[kind])(**{**fields, **overrides})


def tiny_vision_config(kind: str, *, d_vision: int = 32, layers: int = 3, image_size: int = 32, patch_size: int = 8):
    """A tiny ``CLIPVisionConfig`` (``clip``) or ``SiglipVisionConfig`` (``siglip``)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    fields = dict(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        return CLIPVisionConfig(**fields)
    if kind == "siglip":
        return SiglipVisionConfig(**fields)
    raise ValueError(f"vision tower kind must be 'clip' or 'siglip', got {kind!r}")


def tiny_image_processor(kind: str, image_size: int):
    """CLIP (resize shortest edge + centre crop) or SigLIP (resize to a square) image processing."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if kind == "siglip":
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_llava_towers(
    text: str = "llama",
    vision: str = "clip",
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 3,
    text_layers: int = 3,
    d_vision: int = 32,
    d_model: int = 48,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vision_feature_layer: Union[int, Sequence[int]] = -2,
    strategy: Optional[str] = None,
    padding_side: str = "left",
    d_mlp: Optional[int] = None,
    projector_act: str = "gelu",
    tokenizer=None,
    text_config: Optional[dict] = None,
):
    """A random ``LlavaForConditionalGeneration`` with any supported text and vision tower, and its processor.

    ``strategy`` defaults to ``"full"`` for SigLIP (no class token) and ``"default"`` for CLIP; ``text_config``:
    further text config fields (e.g. a ``sliding_window``).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    strategy = strategy or ("full" if vision == "siglip" else "default")
    tokenizer = tokenizer or make_tokenizer(padding_side=padding_side)
    vc = tiny_vision_config(vision, d_vision=d_vision, layers=vision_layers, image_size=image_size,
                            patch_size=patch_size)
    tc = tiny_text_config(text, vocab_size=len(tokenizer), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          layers=text_layers, d_mlp=d_mlp, tokenizer=tokenizer, **(text_config or {}))
    layer = vision_feature_layer if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      projector_hidden_act=projector_act)
    model = LlavaForConditionalGeneration(cfg).eval()
    _spread_init(model)
    processor = LlavaProcessor(image_processor=tiny_image_processor(vision, image_size), tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=int(vision == "clip"))
    return model, processor


def tiny_llava_next(text: str = "llama", vision: str = "clip", *, seed: int = 0, image_size: int = 32,
                    patch_size: int = 8, pinpoints=((32, 64), (64, 32), (64, 64), (32, 96)), padding_side: str = "left",
                    **kwargs):
    """A random ``LlavaNextForConditionalGeneration`` (any-resolution tiling) and its ``LlavaNextProcessor``."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    torch.manual_seed(seed)
    strategy = kwargs.pop("strategy", None) or ("full" if vision == "siglip" else "default")
    layer = kwargs.pop("vision_feature_layer", -2)
    tokenizer = make_tokenizer(padding_side=padding_side)
    vc = tiny_vision_config(vision, d_vision=kwargs.pop("d_vision", 32), layers=kwargs.pop("vision_layers", 2),
                            image_size=image_size, patch_size=patch_size)
    tc = tiny_text_config(text, vocab_size=len(tokenizer), tokenizer=tokenizer, layers=kwargs.pop("text_layers", 2),
                          **kwargs)
    pinpoints = [list(p) for p in pinpoints]
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                          image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _spread_init(model)
    with torch.no_grad():
        model.model.image_newline.normal_(0, 1.0)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy=strategy,
                                   num_additional_image_tokens=int(vision == "clip"))
    return model, processor


# ---------------------------------------------------------------- Gemma 3 and LLaVA-OneVision
GEMMA3_SPECIAL = dict(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")


def tiny_gemma3(*, seed: int = 0, image_size: int = 32, patch_size: int = 8, tokens_per_image: int = 4,
                text_layers: int = 4, sliding_window: int = 8, pattern: int = 2, padding_side: str = "left",
                d_model: int = 48, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 16, d_mlp: Optional[int] = None,
                vision_layers: int = 2, d_vision: int = 32, scaled_rope: bool = True):
    """A random ``Gemma3ForConditionalGeneration`` (SigLIP + Gemma 3) and its ``Gemma3Processor``.

    Every ``pattern``-th text layer is global, the others slide over ``sliding_window`` keys; the global rope is
    linearly scaled (``scaled_rope``), as in Gemma 3 4B and larger. Pan-and-scan crops come with the processor
    option ``do_pan_and_scan=True`` (its defaults: crops of at least 256 px, up to 4, from an aspect ratio of 1.2)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(padding_side=padding_side, special=GEMMA3_SPECIAL)
    rope = dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e6) if scaled_rope else
                dict(rope_type="default", rope_theta=1e6),
                sliding_attention=dict(rope_type="default", rope_theta=1e4))
    tc = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp or 2 * d_model,
        num_hidden_layers=text_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        sliding_window=sliding_window,
        sliding_window_pattern=pattern, max_position_embeddings=4096, query_pre_attn_scalar=24, rope_parameters=rope,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vc = tiny_vision_config("siglip", d_vision=d_vision, layers=vision_layers, image_size=image_size,
                            patch_size=patch_size)
    cfg = Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=tokens_per_image,
                       boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                       image_token_index=tokenizer.image_token_id)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    _spread_init(model)
    with torch.no_grad():  # Gemma's norms multiply by 1 + weight: weights near 0, as trained ones are
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "vision" not in name:
                p.normal_(0, 0.1)
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    return model, Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_length=tokens_per_image)


def tiny_llava_onevision(text: str = "qwen2", vision: str = "siglip", *, seed: int = 0, image_size: int = 32,
                         patch_size: int = 8, pinpoints=((32, 32), (32, 64), (64, 32), (64, 64), (32, 96), (96, 96)),
                         anyres_max: int = 1, padding_side: str = "left", **kwargs):
    """A random ``LlavaOnevisionForConditionalGeneration`` and its ``LlavaOnevisionProcessor``. ``anyres_max``
    (``vision_aspect_ratio="anyres_max_N"``) is small, so that tile maps of 2x2 tiles and more are shrunk."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    torch.manual_seed(seed)
    strategy = "full" if vision == "siglip" else "default"
    tokenizer = make_tokenizer(padding_side=padding_side, special=dict(video_token="<video>"))
    vc = tiny_vision_config(vision, d_vision=kwargs.pop("d_vision", 32), layers=kwargs.pop("vision_layers", 2),
                            image_size=image_size, patch_size=patch_size)
    tc = tiny_text_config(text, vocab_size=len(tokenizer), tokenizer=tokenizer, layers=kwargs.pop("text_layers", 2),
                          **kwargs)
    pinpoints = [list(p) for p in pinpoints]
    ratio = f"anyres_max_{anyres_max}"
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), image_grid_pinpoints=pinpoints, vision_aspect_ratio=ratio, vision_feature_layer=-1,
        vision_feature_select_strategy=strategy)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _spread_init(model)
    with torch.no_grad():
        model.model.image_newline.normal_(0, 1.0)
    grid = (image_size // patch_size) ** 2 + int(vision == "clip")
    image_processor = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                   image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=grid,
                                        vision_feature_select_strategy=strategy, vision_aspect_ratio=ratio)
    return model, processor
