"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models with the real processor classes and a tokenizer made on the spot.

As :mod:`mm_lens.testing` (no download, no hub): a word-level tokenizer with Qwen's special tokens
(``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ...), a ``Qwen2VLImageProcessor`` with small
patches, and random weights of a size that makes every component matter.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mm_lens.testing import WORDS, _spread_init

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
PROMPT = "<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> what is the color of the circle ? <|im_end|>"


def make_qwen_tokenizer(n_filler: int = 40, padding_side: str = "left"):
    """A word-level fast tokenizer (whitespace split, no BOS, as Qwen's) whose special tokens are Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(WORDS) if w and not w.isspace()]
    vocab = {w: i for i, w in enumerate(["<unk>"] + QWEN_SPECIAL + words + [f"w{i}" for i in range(n_filler)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        padding_side=padding_side,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    return tokenizer


def qwen_processor(tokenizer, patch_size: int = 8, merge: int = 2, min_pixels: int = 32 * 32,
                   max_pixels: int = 96 * 96, version: str = "2"):
    """A ``Qwen2VLProcessor`` (``version="3"``: a ``Qwen3VLProcessor``; image and video processors with small
    patches) around ``tokenizer``."""
    import transformers

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image = transformers.Qwen2VLImageProcessor(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=merge)
    video_cls, processor_cls = ((transformers.Qwen3VLVideoProcessor, transformers.Qwen3VLProcessor) if version == "3"
                                else (transformers.Qwen2VLVideoProcessor, transformers.Qwen2VLProcessor))
    video = video_cls(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=merge)
    return processor_cls(image_processor=image, tokenizer=tokenizer, video_processor=video)


def tiny_qwen_vl(version: str = "2", *, seed: int = 0, d_vision: int = 32, vision_layers: int = 3, d_model: int = 48,
                 text_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 96, patch_size: int = 8,
                 mrope_section: Optional[Sequence[int]] = None, window_size: int = 32, full_attention: Sequence[int] = (1,),
                 min_pixels: int = 32 * 32, max_pixels: int = 96 * 96, padding_side: str = "left",
                 tie_word_embeddings: bool = False, d_head: int = 16, deepstack: Sequence[int] = (0, 1),
                 position_side: int = 5):
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2"``), ``Qwen2_5_VLForConditionalGeneration``
    (``"2.5"``: windows of ``window_size`` pixels, full attention at ``full_attention``) or
    ``Qwen3VLForConditionalGeneration`` (``"3"``: heads of ``d_head`` with interleaved M-RoPE, DeepStack mergers
    after the vision layers ``deepstack``, a learned ``position_side`` x ``position_side`` position grid) in eval
    mode, and its processor. ``mrope_section``: default ``(1, 2, 3)``, ``(2, 3, 3)`` for Qwen3-VL."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer(padding_side=padding_side)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=text_layers,
                num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                     mrope_section=list(mrope_section or (1, 2, 3))),
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(depth=vision_layers, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=d_vision, hidden_size=d_model, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(hidden_size=d_vision, out_hidden_size=d_model, intermediate_size=2 * d_vision,
                      window_size=window_size, fullatt_block_indexes=list(full_attention), hidden_act="silu")
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    elif version == "3":
        section = list(mrope_section or (2, 3, 3))
        text.update(head_dim=d_head, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                          mrope_section=section, mrope_interleaved=True))
        vision.update(hidden_size=d_vision, out_hidden_size=d_model, intermediate_size=2 * d_vision,
                      num_position_embeddings=position_side**2, deepstack_visual_indexes=list(deepstack))
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2', '2.5' or '3', got {version!r}")
    cfg = config_cls(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings)
    model = model_cls(cfg).eval()
    _spread_init(model)
    return model, qwen_processor(tokenizer, patch_size, 2, min_pixels, max_pixels, version="3" if version == "3" else "2")
