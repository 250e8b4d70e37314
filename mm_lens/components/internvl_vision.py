"""InternViT (InternVL's vision tower), hooked as the rest of the model: the ViT of :mod:`mm_lens.components.vision`
(class token, learned positions, the same :class:`~mm_lens.components.block.Block`) with InternViT's options.

* Norms: LayerNorm (InternViT-300M) or RMSNorm (InternViT-6B) in every block (``normalization_type``); the final
  ``layernorm`` (``ln_post``, always a LayerNorm) only when the config does not mean-pool (``use_mean_pooling=False``).
* Layer scale: Hugging Face multiplies the attention and MLP outputs by ``lambda_1`` / ``lambda_2`` before adding
  them to the residual stream. The conversion folds them into ``W_O``/``b_O`` and ``W_out``/``b_out`` (exact:
  ``lambda * (z W + b) = z (W lambda) + b lambda``), so ``hook_attn_out`` / ``hook_mlp_out`` hold what is added to
  the residual stream, as in TransformerLens.
* q/k norm (``use_qk_norm``, InternViT-6B): one RMSNorm over all heads of a query (and of a key) at once, after
  ``hook_q`` / ``hook_k``: ``attn.q_norm`` / ``attn.k_norm`` (:class:`JointHeadNorm`; ``hook_scale [n, pos, 1]``,
  ``hook_normalized [n, pos, d_model]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from mm_lens.components.norms import Norm, make_norm
from mm_lens.components.vision import VisionEncoder
from mm_lens.config import VisionConfig


@dataclass(frozen=True)
class InternVisionConfig(VisionConfig):
    """``qk_norm``: RMSNorm over every head of queries and keys (eps ``qk_norm_eps``); ``attention_bias``: q/k/v
    projections with biases."""

    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    attention_bias: bool = False


class JointHeadNorm(Norm):
    """RMSNorm over all heads of a position together (InternViT's q/k norm), on ``[batch, pos, head, d_head]``."""

    def forward(self, x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        return super().forward(x.flatten(-2)).unflatten(-1, x.shape[-2:])


class InternVisionEncoder(VisionEncoder):
    """:class:`VisionEncoder` with InternViT's q/k norms where the config has them."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__(cfg)
        if cfg.has_ln_post:  # Hugging Face's final layernorm is a LayerNorm whatever the blocks' norm type
            self.ln_post = make_norm("LN", cfg.d_model, cfg.eps)
        if cfg.qk_norm:
            for block in self.blocks:
                block.attn.q_norm = JointHeadNorm(cfg.d_model, cfg.qk_norm_eps, center=False, bias=False)
                block.attn.k_norm = JointHeadNorm(cfg.d_model, cfg.qk_norm_eps, center=False, bias=False)
