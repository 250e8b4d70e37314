"""A pre-norm transformer block with TransformerLens 2.x hook names."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.attention import Attention, AttentionMask
from mm_lens.components.kv_cache import KVCacheEntry
from mm_lens.components.mlp import MLP
from mm_lens.components.norms import make_norm


class Block(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    ``parallel=True`` (TL's ``parallel_attn_mlp``): ``resid_post = resid_pre + attn(ln1(resid_pre)) +
    mlp(ln2(resid_pre))``, and ``hook_resid_mid`` is not used.

    ``post_norms=True`` (TL's ``use_normalization_before_and_after``; Gemma 2 and 3's "sandwich" norms): the
    attention and MLP outputs go through norms of their own, ``ln1_post`` and ``ln2_post``, before
    ``hook_attn_out``/``hook_mlp_out``, so those hooks still hold what is added to the residual stream.
    ``attention`` holds the keyword arguments of :class:`Attention` (``window``, ``qk_norm``, ``attn_scale``,
    ``softcap``).

    ``visual_in=True`` (Qwen3-VL's DeepStack layers): after ``hook_resid_post`` the block adds the vision features
    it is given (``visual``, zero at text positions) through ``hook_visual_in``, so it returns the next block's
    ``resid_pre = resid_post + visual_in``; ``hook_resid_post`` stays what the block's own layers wrote (Hugging
    Face's ``hidden_states[l + 1]``), and ``embed + sum(attn_out + mlp_out + visual_in)`` is the residual stream.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_mlp: int,
        *,
        n_kv_heads: Optional[int] = None,
        act_fn: str,
        gated: bool,
        norm: str,
        eps: float,
        use_rotary: bool,
        parallel: bool = False,
        post_norms: bool = False,
        visual_in: bool = False,
        **attention,
    ):
        super().__init__()
        self.parallel = parallel
        self.ln1 = make_norm(norm, d_model, eps)
        self.attn = Attention(d_model, n_heads, d_head, n_kv_heads, use_rotary=use_rotary, eps=eps, **attention)
        self.ln2 = make_norm(norm, d_model, eps)
        self.mlp = MLP(d_model, d_mlp, act_fn, gated)
        # weight processing never folds these (they read an output, not the residual stream): always with weights
        self.ln1_post = make_norm(norm.removesuffix("Pre"), d_model, eps) if post_norms else None
        self.ln2_post = make_norm(norm.removesuffix("Pre"), d_model, eps) if post_norms else None
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        # [batch, pos, d_model]: DeepStack vision features added after resid_post, zero at text positions
        self.hook_visual_in = HookPoint() if visual_in else None

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        rotary=None,
        past: Optional[KVCacheEntry] = None,
        n_out: Optional[int] = None,
        visual: Optional[Float[Tensor, "batch pos d_model"]] = None,
    ) -> Float[Tensor, "batch out_pos d_model"]:
        """The block on new positions after ``past`` keys/values; ``n_out``: only the last ``n_out``
        positions go on past attention (their keys and values still come from every position). ``visual``: with
        ``visual_in``, what ``hook_visual_in`` adds (None: zeros); its trailing positions line up with the output."""
        resid_post = self._layers(resid_pre, mask, rotary, past, n_out)
        if self.hook_visual_in is None:
            if visual is not None:
                raise ValueError("this block takes no vision features (it is not a DeepStack layer)")
            return resid_post
        visual = torch.zeros_like(resid_post) if visual is None else visual[:, -resid_post.shape[1]:]
        return resid_post + self.hook_visual_in(visual.to(resid_post.device, resid_post.dtype))

    def _layers(self, resid_pre: Tensor, mask: AttentionMask, rotary, past: Optional[KVCacheEntry],
                n_out: Optional[int]) -> Float[Tensor, "batch out_pos d_model"]:
        """Attention and MLP: ``hook_resid_post``."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(self.ln1(resid_pre), mask, rotary, past, n_out)
        attn_out = self.hook_attn_out(attn_out if self.ln1_post is None else self.ln1_post(attn_out))
        if n_out is not None:
            resid_pre = resid_pre[:, -n_out:]
        if self.parallel:  # TL 2.x parallel_attn_mlp: no resid_mid; ln2 reads resid_pre (Phi-2: same weights as ln1)
            mlp_out = self.hook_mlp_out(self._mlp(self.hook_mlp_in(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self._mlp(self.hook_mlp_in(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _mlp(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.mlp(self.ln2(x))
        return out if self.ln2_post is None else self.ln2_post(out)
