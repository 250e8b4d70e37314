"""Tiny random Idefics3 / SmolVLM and InternVL models with the real processor classes and a tokenizer made on the spot.

As :mod:`mm_lens.testing` (no download, no hub): a word-level tokenizer with the family's special tokens (Idefics3's
``<fake_token_around_image>``, ``<global-img>``, ``<row_r_col_c>`` and a ``\\n`` token, so row breaks inside an
image are tokens as with the real tokenizers; InternVL's ``<img>``, ``<IMG_CONTEXT>``, ``</img>``), the family's
image processor with small crops, and random weights of a size that makes every component matter.
"""

from __future__ import annotations

import torch

from mm_lens.testing import _spread_init, make_tokenizer

IDEFICS3_SPECIAL = dict(image_token="<image>", fake_image_token="<fake_token_around_image>",
                        global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")
INTERNVL_SPECIAL = dict(image_token="<IMG_CONTEXT>", context_image_token="<IMG_CONTEXT>", start_image_token="<img>",
                        end_image_token="</img>", video_token="<video>")
IDEFICS3_PROMPT = "USER: <image>\nwhat is the color of the circle ? <end_of_utterance>\nASSISTANT:"
INTERNVL_PROMPT = "USER: <IMG_CONTEXT>\nwhat is the color of the circle ? ASSISTANT:"


def make_idefics3_tokenizer(padding_side: str = "left"):
    """A word-level tokenizer (BOS ``<s>``) with Idefics3's special tokens, every ``<row_r_col_c>`` and ``\\n``."""
    from tokenizers import AddedToken

    tokenizer = make_tokenizer(padding_side=padding_side, special=IDEFICS3_SPECIAL)
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<row_{r}_col_{c}>" for r in range(1, 7)
                                                                for c in range(1, 7)]})
    tokenizer.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return tokenizer


def _text_config(kind: str, tokenizer, d_model: int, layers: int, n_heads: int, n_kv_heads: int, d_mlp: int) -> dict:
    return dict(model_type=kind, vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
                num_hidden_layers=layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **(dict(head_dim=16) if kind == "qwen3" else {}))


def tiny_idefics3(kind: str = "idefics3", *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                  scale_factor: int = 2, longest_edge: int = 96, vision_layers: int = 2, text_layers: int = 3,
                  d_vision: int = 32, d_model: int = 48, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 96,
                  padding_side: str = "left", tie_word_embeddings: bool = False):
    """A random ``Idefics3ForConditionalGeneration`` (``kind="idefics3"``) or ``SmolVLMForConditionalGeneration``
    (``"smolvlm"``) in eval mode and its processor: crops of ``image_size`` px (up to ``longest_edge /
    image_size`` tiles per side, then the global image), ``(image_size / patch_size / scale_factor)**2`` tokens each."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = make_idefics3_tokenizer(padding_side)
    vision = dict(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = _text_config("llama", tokenizer, d_model, text_layers, n_heads, n_kv_heads, d_mlp)
    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}.get(kind)
    if prefix is None:
        raise ValueError(f"kind must be 'idefics3' or 'smolvlm', got {kind!r}")
    cfg = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor, tie_word_embeddings=tie_word_embeddings)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg).eval()
    _spread_init(model)
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size})
    seq = (image_size // patch_size // scale_factor) ** 2
    if kind == "idefics3":
        processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                   image_seq_len=seq)
    else:
        processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=transformers.SmolVLMVideoProcessor(),
                                                  image_seq_len=seq)
    return model, processor


def tiny_internvl(*, seed: int = 0, image_size: int = 32, patch_size: int = 8, max_patches: int = 6,
                  text: str = "qwen2", vision_layers: int = 2, text_layers: int = 3, d_vision: int = 32, d_model: int = 48,
                  n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 96, qk_norm: bool = False, norm: str = "layer_norm",
                  mean_pooling: bool = True, attention_bias: bool = True, feature_layer: int = -1,
                  padding_side: str = "left", tie_word_embeddings: bool = False):
    """A random ``InternVLForConditionalGeneration`` and its ``InternVLProcessor``: crops of ``image_size`` px (up to
    ``max_patches`` tiles, then a thumbnail), 2x2 pixel shuffle. InternViT-6B's options: ``qk_norm=True,
    norm="rms_norm", mean_pooling=False`` (a final LayerNorm)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(padding_side=padding_side, special=INTERNVL_SPECIAL)
    vision = dict(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size, use_qk_norm=qk_norm,
                  norm_type=norm, use_mean_pooling=mean_pooling, attention_bias=attention_bias)
    cfg = transformers.InternVLConfig(
        vision_config=vision, text_config=_text_config(text, tokenizer, d_model, text_layers, n_heads, n_kv_heads,
                                                       d_mlp),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=(image_size // patch_size // 2) ** 2,
        downsample_ratio=0.5, vision_feature_layer=feature_layer, tie_word_embeddings=tie_word_embeddings)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    _spread_init(model)
    with torch.no_grad():  # layer scales away from 1 (trained ones are), so that folding them matters
        for name, p in model.named_parameters():
            if "lambda_" in name:
                p.uniform_(0.3, 1.5)
    image_processor = transformers.GotOcr2ImageProcessor(size={"height": image_size, "width": image_size},
                                                         crop_to_patches=True, max_patches=max_patches)
    processor = transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=transformers.InternVLVideoProcessor(),
                                               image_seq_length=cfg.image_seq_length)
    return model, processor
