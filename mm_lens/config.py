"""Configuration of a hooked vision-language model.

The language-model fields sit flat on :class:`VLMConfig`, named as TransformerLens
reads them (``n_layers``, ``d_model``, ``n_heads``, ``normalization_type``, ...), so the
kept TransformerLens infrastructure (``ActivationCache``, ``patching``) works on it.
The vision tower and the projector have configs of their own, nested inside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "double": torch.float64,
}


def as_dtype(value: Union[None, str, torch.dtype], default: torch.dtype = torch.float32) -> torch.dtype:
    """A floating-point dtype from a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``, ``"bf16"``)."""
    if value is None:
        return default
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use a torch dtype or one of {sorted(DTYPES)}")
        return DTYPES[name]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or its name, got {value!r}")
    return value


@dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower (CLIP-style: class token, pre-LayerNorm, learned positions)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    image_size: int
    patch_size: int
    n_channels: int = 3
    act_fn: str = "quick_gelu"
    eps: float = 1e-5
    has_cls_token: bool = True
    has_ln_pre: bool = True
    has_ln_post: bool = True
    patch_bias: bool = False
    architecture: str = "clip"
    normalization_type: str = "LN"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) patch grid."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def n_ctx(self) -> int:
        """Sequence length inside the tower (patches plus the class token, if any)."""
        return self.n_patches + int(self.has_cls_token)


@dataclass(frozen=True)
class ProjectorConfig:
    """Maps selected vision features to the language model's width.

    ``kind`` is ``"mlp2x_gelu"`` (linear, activation, linear), ``"linear"``, or ``"pooled"`` (Gemma 3: the
    patch grid average-pooled to ``tokens_per_side`` x ``tokens_per_side`` soft tokens, RMSNorm with ``eps``,
    then a linear map without bias).
    """

    kind: str
    d_in: int
    d_out: int
    act_fn: str = "gelu"
    bias: bool = True
    tokens_per_side: Optional[int] = None
    eps: float = 1e-6


@dataclass(frozen=True)
class VLMConfig:
    """Language-model fields flat (as TransformerLens reads them), vision and projector nested."""

    # language model (TransformerLens names)
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: Optional[int] = None
    n_ctx: int = 4096
    act_fn: str = "silu"
    normalization_type: str = "RMS"
    eps: float = 1e-6
    gated_mlp: bool = True
    attn_bias: bool = False
    mlp_bias: bool = False
    positional_embedding_type: str = "rotary"
    rotary_dim: Optional[int] = None
    rotary_base: float = 10000.0
    attn_only: bool = False
    parallel_attn_mlp: bool = False  # attention and MLP both read resid_pre (GPT-J / Phi-2 blocks)
    final_rms: bool = True
    # Gemma-style options and sliding windows (TransformerLens' names and defaults; -1 = off / default)
    use_qk_norm: bool = False  # RMSNorm on each head's queries and keys (attn.q_norm / attn.k_norm)
    use_normalization_before_and_after: bool = False  # sandwich norms: blocks.{l}.ln1_post / ln2_post
    attn_scale: float = -1.0  # scores are divided by it; -1: sqrt(d_head)
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_local_attn: bool = False  # sliding-window layers (attn_types "local") attend to the last window_size keys
    window_size: Optional[int] = None
    attn_types: Optional[tuple[str, ...]] = None  # per layer: "global" or "local"
    rotary_base_local: Optional[float] = None  # rotary base of the local layers (Gemma 3), rotary_base otherwise
    original_architecture: str = "LlavaForConditionalGeneration"
    model_name: str = "custom"
    use_attn_result: bool = False
    attn_implementation: str = "auto"  # "auto" (SDPA unless a hook needs the pattern) | "eager"
    device: Union[str, torch.device] = "cpu"
    dtype: torch.dtype = torch.float32
    # multimodal
    vision: Optional[VisionConfig] = None
    projector: Optional[ProjectorConfig] = None
    vision_feature_layer: Union[int, tuple[int, ...]] = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int = -1
    bidirectional_image_attention: bool = False  # Gemma 3: the tokens of one image attend to each other
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict, compare=False)
    # tokenization as TransformerLens reads it (HookedVLM fills the two BOS fields from its tokenizer)
    default_prepend_bos: Optional[bool] = None  # None: as the tokenizer does (the checkpoint's own convention)
    tokenizer_prepends_bos: Optional[bool] = None
    default_padding_side: Optional[str] = None  # None: the tokenizer's side, else "right" (TransformerLens 3 and 4)

    def __post_init__(self) -> None:
        if self.n_key_value_heads is None:
            object.__setattr__(self, "n_key_value_heads", self.n_heads)
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.d_head)
        if self.attn_scale == -1.0:
            object.__setattr__(self, "attn_scale", float(self.d_head) ** 0.5)
        if self.attn_types is not None:
            object.__setattr__(self, "attn_types", tuple(self.attn_types))
            if len(self.attn_types) != self.n_layers or not set(self.attn_types) <= {"global", "local"}:
                raise ValueError(f"attn_types must give 'global' or 'local' for each of the {self.n_layers} layers, "
                                 f"got {self.attn_types}")
        if self.use_local_attn and not self.window_size:
            raise ValueError("use_local_attn needs window_size (the number of keys a local layer sees)")
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads "
                f"({self.n_key_value_heads})"
            )

    # TransformerLens reads these names too
    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_params(self) -> int:
        return self.n_layers * (4 * self.d_model * self.d_model + 3 * self.d_model * self.d_mlp)

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer`` (None: it attends to every earlier position)."""
        if not self.use_local_attn or (self.attn_types is not None and self.attn_types[layer] != "local"):
            return None
        return self.window_size

    # HookedTransformerConfig fields TransformerLens utilities read, with the value that describes HookedVLM
    n_devices = property(lambda self: 1)  # a device map places parts itself (HookedVLM.device_map)
    tokenizer_name = property(lambda self: self.model_name)
    attention_dir = property(lambda self: "causal")
    use_hook_tokens = property(lambda self: False)
    use_split_qkv_input = property(lambda self: False)
    use_hook_mlp_in = property(lambda self: False)
    use_attn_in = property(lambda self: False)
    ungroup_grouped_query_attention = property(lambda self: False)

    def to_dict(self) -> dict:
        """The fields as a dict (shallow: the vision and projector configs stay dataclasses), as
        ``HookedTransformerConfig.to_dict``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The vision layers whose hidden states feed the projector, as a tuple."""
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def n_image_tokens(self) -> int:
        """Language-model positions one image occupies."""
        if self.vision is None:
            return 0
        if self.projector is not None and self.projector.tokens_per_side:
            return self.projector.tokens_per_side**2
        extra = int(self.vision.has_cls_token and self.vision_feature_select_strategy == "full")
        return self.vision.n_patches + extra

    def replace(self, **changes) -> "VLMConfig":
        return dataclasses.replace(self, **changes)
