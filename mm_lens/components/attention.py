"""Multi-head (and grouped-query) attention with TransformerLens 2.x hooks and weights.

Two paths compute the same thing: ``scaled_dot_product_attention`` when nothing
hooks ``hook_attn_scores``/``hook_pattern`` (no hook, no cost), and the eager path,
which materialises scores and pattern, otherwise.

Queries are always the last positions of the keys: with past keys/values (a
:class:`~mm_lens.components.kv_cache.KVCacheEntry`) the new positions follow the cached ones, and
``n_out`` keeps only the last ``n_out`` queries (keys and values still come from every new
position). Masks are built for "``n_q`` queries ending at key ``n_k - 1``", so the same mask object
serves a full run, a cached step and a resumed suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.kv_cache import KVCacheEntry
from mm_lens.components.rotary import apply_rotary


@dataclass
class AttentionMask:
    """Who may attend to whom in one forward pass.

    ``causal``: queries see keys at or before their own position. ``key_mask``
    ``[batch, key_pos]``: False at padding. A query always sees itself, so a row
    with nothing else left (left padding, a full knockout) stays finite.
    """

    causal: bool
    key_mask: Optional[Bool[Tensor, "batch key_pos"]] = None
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def trivial(self) -> bool:
        return self.key_mask is None

    def dense(self, n_q: int, n_k: int, device: torch.device) -> Optional[Bool[Tensor, "batch 1 q k"]]:
        """Boolean mask (True = may attend) for ``n_q`` queries that end at key ``n_k - 1``."""
        if not self.causal and self.key_mask is None:
            return None
        key = (n_q, n_k, str(device))
        if key not in self._dense:
            q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
            k_pos = torch.arange(n_k, device=device)[None, :]
            mask = (k_pos <= q_pos) if self.causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
            mask = mask[None, None]
            if self.key_mask is not None:
                mask = mask & self.key_mask[:, None, None, :].to(device)
            mask = mask | (k_pos == q_pos)[None, None]
            self._dense[key] = mask
        return self._dense[key]

    def additive(self, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype
                 ) -> Optional[Float[Tensor, "batch_or_1 1 q k"]]:
        """The same mask as 0 / -inf, to add to attention scores."""
        dense = self.dense(n_q, n_k, device)
        if dense is None:
            return None
        key = ("add", n_q, n_k, str(device), dtype)
        if key not in self._dense:
            self._dense[key] = torch.zeros(dense.shape, dtype=dtype, device=device).masked_fill_(~dense, float("-inf"))
        return self._dense[key]

    def repeat(self, k: int) -> "AttentionMask":
        """The mask of a batch repeated ``k`` times (copy j in rows ``j * batch .. (j + 1) * batch - 1``)."""
        if k == 1 or self.key_mask is None:
            return self
        return AttentionMask(self.causal, self.key_mask.repeat(k, 1))


class Attention(nn.Module):
    """Weights in TransformerLens layout: ``W_Q [n_heads, d_model, d_head]``, ``W_O [n_heads, d_head, d_model]``.

    With grouped-query attention the stored key/value weights are ``_W_K``/``_W_V``
    ``[n_key_value_heads, d_model, d_head]``; ``W_K``/``W_V`` repeat them per query head.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, n_kv_heads: Optional[int] = None, *, use_rotary: bool):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.use_rotary = use_rotary
        self.use_attn_result = False
        self.force_eager = False
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self._W_K = nn.Parameter(torch.empty(n_kv_heads, d_model, d_head))
        self._W_V = nn.Parameter(torch.empty(n_kv_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self._b_K = nn.Parameter(torch.zeros(n_kv_heads, d_head))
        self._b_V = nn.Parameter(torch.zeros(n_kv_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model]

    # ---- weights as TransformerLens exposes them
    @property
    def repeat(self) -> int:
        return self.n_heads // self.n_kv_heads

    def _per_query_head(self, t: Tensor) -> Tensor:
        return t if self.repeat == 1 else t.repeat_interleave(self.repeat, dim=0)

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._per_query_head(self._W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._per_query_head(self._W_V)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self._per_query_head(self._b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self._per_query_head(self._b_V)

    # ---- forward
    @staticmethod
    def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """``x [batch, pos, d_model]`` through per-head weights ``W [heads, d_model, d_head]``."""
        n, d_model, d_head = W.shape
        flat = W.permute(1, 0, 2).reshape(d_model, n * d_head)
        out = torch.addmm(b.reshape(-1), x.reshape(-1, d_model), flat)
        return out.view(*x.shape[:-1], n, d_head)

    def needs_eager(self) -> bool:
        return self.force_eager or watched(self.hook_attn_scores) or watched(self.hook_pattern)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        past: Optional[KVCacheEntry] = None,
        n_out: Optional[int] = None,
    ) -> Float[Tensor, "batch out_pos d_model"]:
        """Attention of the new positions ``x`` over ``past`` keys/values and their own; the output (and
        every query-side hook) covers the last ``n_out`` positions (all by default)."""
        x_q = x if n_out is None else x[:, -n_out:]
        q = self.hook_q(self._project(x_q, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(x, self._W_K, self._b_K))
        v = self.hook_v(self._project(x, self._W_V, self._b_V))
        if self.use_rotary:
            cos, sin = rotary
            q = self.hook_rot_q(apply_rotary(q, cos[:, -q.shape[1]:], sin[:, -q.shape[1]:]))
            k = self.hook_rot_k(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        if past is not None:
            k, v = past.append(k, v)
        if self.needs_eager():
            z = self._eager(q, k, v, mask)
        else:
            z = self._sdpa(q, k, v, mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head_index, d_head]
        if self.use_attn_result:
            result = self.hook_result(torch.einsum("bphe,hed->bphd", z, self.W_O))
            return result.sum(-2) + self.b_O
        flat_O = self.W_O.reshape(-1, self.W_O.shape[-1])
        return torch.addmm(self.b_O, z.reshape(-1, flat_O.shape[0]), flat_O).view(*z.shape[:2], -1)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        gqa = self.repeat > 1
        n_q, n_k = q.shape[2], k.shape[2]
        if mask.trivial and (not mask.causal or n_q == 1 or n_q == n_k):
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal and n_q > 1, enable_gqa=gqa)
        # queries after cached keys, or padding: an explicit 0 / -inf mask (faster in SDPA than a boolean one)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(n_q, n_k, q.device, q.dtype),
                                              enable_gqa=gqa)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        if self.repeat > 1:
            k = k.repeat_interleave(self.repeat, dim=1)
            v = v.repeat_interleave(self.repeat, dim=1)
        b, h, n_q, e = q.shape
        n_k = k.shape[2]
        qs, kt = q.reshape(b * h, n_q, e), k.reshape(b * h, n_k, e).transpose(1, 2)
        additive = mask.additive(n_q, n_k, q.device, q.dtype)
        if additive is None:
            scores = torch.bmm(qs, kt).mul_(self.d_head**-0.5)
        else:  # scale and mask in one pass: -inf where a query may not look
            additive = additive.expand(b, h, n_q, n_k).reshape(b * h, n_q, n_k) if additive.shape[0] > 1 else additive[0]
            scores = torch.baddbmm(additive, qs, kt, alpha=self.d_head**-0.5)
        scores = self.hook_attn_scores(scores.view(b, h, n_q, n_k))
        # softmax in float32 (as Hugging Face does), back in the input's dtype
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.hook_pattern(pattern) @ v


def watched(hook: HookPoint) -> bool:
    """Whether anything is attached to a HookPoint (a hook or a cache may read what passes through it), or an
    nnsight trace running now asks for it (:func:`nnsight_reads`)."""
    return bool(hook.fwd_hooks or hook.bwd_hooks or hook._forward_hooks or hook._backward_hooks) or nnsight_reads(hook)


def nnsight_reads(hook: HookPoint) -> bool:
    """Whether an nnsight trace running now waits on this HookPoint (``.output``/``.input``/``.skip``) or caches it.

    nnsight (``NNsight(model)``) hands a module's output to the trace when the module runs, and adds no torch
    hook, so without this the SDPA path would never call ``hook_pattern`` and the trace would stop with
    nnsight's ``OutOfOrderError``. Reads nnsight's per-module state (``module.__dict__["__nnsight__"]``);
    if that changes shape, every instrumented attention takes the eager path while a trace runs.
    """
    state = hook.__dict__.get("__nnsight__")
    if state is None:
        return False
    try:
        interleaver, _, locations = state.active()
        if interleaver is None:
            return False
        return any(loc in interleaver.parked or loc in interleaver.observers for loc in locations)
    except (AttributeError, TypeError, ValueError):
        return True
