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
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.components.kv_cache import KVCacheEntry
from mm_lens.components.norms import make_norm
from mm_lens.components.rotary import apply_rotary


@dataclass
class AttentionMask:
    """Who may attend to whom in one forward pass.

    ``causal``: queries see keys at or before their own position. ``key_mask`` ``[batch, key_pos]``: False at
    padding. ``groups`` ``[batch, pos]`` (over every key position): the image group of each position, -1 for
    text; a query also sees every key of its own group, later ones included (Gemma 3's bidirectional attention
    among the tokens of one image, Hugging Face's ``token_type_ids`` blocks). A layer with a sliding ``window``
    asks :meth:`dense` with it: a query then sees only keys fewer than ``window`` positions back (later keys of
    its own image group stay visible), as Hugging Face's ``AND(sliding_window, OR(causal, blockwise))``. A
    query always sees itself, so a row with nothing else left (left padding, a full knockout) stays finite.
    """

    causal: bool
    key_mask: Optional[Bool[Tensor, "batch key_pos"]] = None
    groups: Optional[Int[Tensor, "batch pos"]] = None
    _dense: dict = field(default_factory=dict, repr=False)

    def trivial(self, window: Optional[int] = None) -> bool:
        """Plain causal (or full) attention: nothing but ``causal`` to honour."""
        return self.key_mask is None and self.groups is None and window is None

    def dense(self, n_q: int, n_k: int, device: torch.device, window: Optional[int] = None
              ) -> Optional[Bool[Tensor, "batch 1 q k"]]:
        """Boolean mask (True = may attend) for ``n_q`` queries that end at key ``n_k - 1``."""
        window = effective_window(window, n_k)
        if not self.causal and self.key_mask is None and window is None:
            return None
        key = (n_q, n_k, str(device), window)
        if key not in self._dense:
            q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
            k_pos = torch.arange(n_k, device=device)[None, :]
            mask = (k_pos <= q_pos) if self.causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
            mask = mask[None, None]
            if self.groups is not None and self.causal:
                groups = self.groups.to(device)
                g_q, g_k = groups[:, n_k - n_q:n_k, None], groups[:, None, :n_k]
                mask = mask | ((g_q == g_k) & (g_q >= 0))[:, None]
            if window is not None:
                mask = mask & (k_pos > q_pos - window)[None, None]
            if self.key_mask is not None:
                mask = mask & self.key_mask[:, None, None, :n_k].to(device)
            mask = mask | (k_pos == q_pos)[None, None]
            self._dense[key] = mask
        return self._dense[key]

    def additive(self, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype, window: Optional[int] = None
                 ) -> Optional[Float[Tensor, "batch_or_1 1 q k"]]:
        """The same mask as 0 / -inf, to add to attention scores."""
        dense = self.dense(n_q, n_k, device, window)
        if dense is None:
            return None
        key = ("add", n_q, n_k, str(device), dtype, effective_window(window, n_k))
        if key not in self._dense:
            self._dense[key] = torch.zeros(dense.shape, dtype=dtype, device=device).masked_fill_(~dense, float("-inf"))
        return self._dense[key]

    def repeat(self, k: int) -> "AttentionMask":
        """The mask of a batch repeated ``k`` times (copy j in rows ``j * batch .. (j + 1) * batch - 1``)."""
        if k == 1 or (self.key_mask is None and self.groups is None):
            return self
        return AttentionMask(self.causal, None if self.key_mask is None else self.key_mask.repeat(k, 1),
                             None if self.groups is None else self.groups.repeat(k, 1))

    def first_reader(self, position: int) -> int:
        """The first query position whose output can depend on keys at ``position`` or later: ``position``
        itself under causal attention, the start of its image group when earlier tokens of that group see it."""
        if self.groups is None or not self.causal:
            return position
        group = self.groups[:, position:position + 1]
        same = (self.groups[:, :position] == group) & (group >= 0)
        hits = same.any(0).nonzero()
        return int(hits[0]) if len(hits) else position


def effective_window(window: Optional[int], n_k: int) -> Optional[int]:
    """A sliding window only restricts anything once there are more keys than it spans."""
    return window if window is not None and n_k > window else None


def image_groups(is_image: Bool[Tensor, "batch pos"], past: Optional[Tensor] = None) -> Int[Tensor, "batch pos"]:
    """Each position's image group (-1 for text): a run of consecutive image positions is one group, as Hugging
    Face numbers ``token_type_ids`` blocks. ``past`` ``[batch, past_pos]``: the groups of the positions before
    these (a key/value cache); the result then covers both. An image cut between the two is a ValueError: its
    first positions could not have seen its last ones."""
    previous = F.pad(is_image[:, :-1], (1, 0), value=False)
    number = (is_image & ~previous).long().cumsum(1) - 1
    groups = torch.where(is_image, number, torch.full_like(number, -1))
    if past is None or past.shape[1] == 0:
        return groups
    if bool(((past[:, -1] >= 0) & is_image[:, 0]).any()):
        raise ValueError("these positions continue an image whose first positions are in the key/value cache; the "
                         "tokens of one image attend to each other, so run each image in one forward")
    shifted = groups + past.max(dim=1, keepdim=True).values.clamp(min=-1) + 1
    return torch.cat([past, torch.where(groups < 0, groups, shifted)], dim=1)


class Attention(nn.Module):
    """Weights in TransformerLens layout: ``W_Q [n_heads, d_model, d_head]``, ``W_O [n_heads, d_head, d_model]``.

    With grouped-query attention the stored key/value weights are ``_W_K``/``_W_V``
    ``[n_key_value_heads, d_model, d_head]``; ``W_K``/``W_V`` repeat them per query head.

    Options (TransformerLens' config names): ``window`` (``window_size`` of a local layer: a query sees the
    keys fewer than ``window`` positions back), ``qk_norm`` (``use_qk_norm``: RMSNorm over each head's query
    and key after ``hook_q``/``hook_k``, before rotary: ``attn.q_norm``, ``attn.k_norm``), ``attn_scale``
    (scores are divided by it; ``sqrt(d_head)`` by default, Gemma's ``sqrt(query_pre_attn_scalar)``),
    ``softcap`` (``attn_scores_soft_cap``: ``cap * tanh(scores / cap)`` before the mask).
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, n_kv_heads: Optional[int] = None, *, use_rotary: bool,
                 window: Optional[int] = None, qk_norm: bool = False, eps: float = 1e-6,
                 attn_scale: Optional[float] = None, softcap: Optional[float] = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.use_rotary = use_rotary
        self.window = window
        self.scaling = d_head**-0.5 if attn_scale is None else 1.0 / float(attn_scale)  # what scores are multiplied by
        self.softcap = softcap
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
        self.q_norm = make_norm("RMS", d_head, eps) if qk_norm else None  # hook_scale/hook_normalized per head
        self.k_norm = make_norm("RMS", d_head, eps) if qk_norm else None
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model]

    @property
    def attn_scale(self) -> float:
        """What the scores are divided by (TransformerLens' ``attn_scale``)."""
        return 1.0 / self.scaling

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
        return (self.force_eager or self.softcap is not None or watched(self.hook_attn_scores)
                or watched(self.hook_pattern))

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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
        window = effective_window(self.window, n_k)
        if mask.trivial(window) and (not mask.causal or n_q == 1 or n_q == n_k):
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal and n_q > 1, enable_gqa=gqa,
                                                  scale=self.scaling)
        # queries after cached keys, padding, image groups or a window: an explicit 0 / -inf mask (faster in SDPA
        # than a boolean one)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(n_q, n_k, q.device, q.dtype, window),
                                              enable_gqa=gqa, scale=self.scaling)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        if self.repeat > 1:
            k = k.repeat_interleave(self.repeat, dim=1)
            v = v.repeat_interleave(self.repeat, dim=1)
        b, h, n_q, e = q.shape
        n_k = k.shape[2]
        qs, kt = q.reshape(b * h, n_q, e), k.reshape(b * h, n_k, e).transpose(1, 2)
        additive = mask.additive(n_q, n_k, q.device, q.dtype, self.window)
        if additive is not None:
            additive = additive.expand(b, h, n_q, n_k).reshape(b * h, n_q, n_k) if additive.shape[0] > 1 else additive[0]
        if additive is None or self.softcap is not None:
            scores = qs.new_empty(b * h, n_q, n_k).baddbmm_(qs, kt, beta=0.0, alpha=self.scaling)  # scaled in one pass
            if self.softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before the mask
                scores = torch.tanh(scores.div_(self.softcap)) * self.softcap  # not in place: tanh's backward reads it
            if additive is not None:
                scores = scores + additive
        else:  # scale and mask in one pass: -inf where a query may not look
            scores = torch.baddbmm(additive, qs, kt, alpha=self.scaling)
        return self._weigh(self.hook_attn_scores(scores.view(b, h, n_q, n_k)), v)

    def _weigh(self, scores: Float[Tensor, "batch head q k"], v: Float[Tensor, "batch head k d_head"]
               ) -> Float[Tensor, "batch head q d_head"]:
        """The eager path after ``hook_attn_scores``: softmax in float32 (as Hugging Face does), back in the
        values' dtype, through ``hook_pattern``, then the weighted sum of the values."""
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
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
