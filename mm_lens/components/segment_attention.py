"""Attention inside segments (Qwen-VL's vision tower: each image, or each window of an image), run segment by
segment.

A :class:`SegmentMask` says which segment each position belongs to; :class:`SegmentAttention` gathers each
segment's positions into a batch row of its own, so windowed attention costs the windows' size, not the image's.
The SDPA path (nothing watches the scores or the pattern) and the eager path both run packed; when a hook watches
``hook_attn_scores`` or ``hook_pattern``, the eager path spreads the packed maps into the dense
``[batch, head, q, k]`` tensor the hook sees, with the same masked entries as a dense computation (-inf scores,
zero pattern; a padding position attends to itself alone). A hook that changes that tensor (returns another one,
or edits it in place) makes the dense tensor drive the rest of the layer, as on :class:`Attention`'s eager path.
While autograd records (gradients through the hooked maps) and where packing would not save work (one segment
per image), the eager path is :class:`Attention`'s dense one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mm_lens.components.attention import Attention, AttentionMask, watched


@dataclass
class SegmentMask(AttentionMask):
    """Non-causal attention inside segments: a query sees the keys of its own segment (``segments [batch, pos]``,
    -1 at padding, which nobody sees). A query always sees itself, so padding rows stay finite."""

    segments: Optional[Int[Tensor, "batch pos"]] = None  # always given (a whole image without padding is no mask)

    def dense(self, n_q: int, n_k: int, device: torch.device, window: Optional[int] = None
              ) -> Optional[Bool[Tensor, "batch 1 q k"]]:
        if window is not None:
            raise ValueError("segment masks take no sliding window")
        key = (n_q, n_k, str(device))
        if key not in self._dense:
            seg = self.segments.to(device)
            q, k = seg[:, n_k - n_q:n_k], seg[:, :n_k]
            same = (q[:, :, None] == k[:, None, :]) & (k >= 0)[:, None, :]
            eye = torch.arange(n_k - n_q, n_k, device=device)[:, None] == torch.arange(n_k, device=device)[None, :]
            self._dense[key] = (same | eye)[:, None]
        return self._dense[key]

    def repeat(self, k: int) -> "SegmentMask":
        return self if k == 1 else SegmentMask(False, segments=self.segments.repeat(k, 1))

    def packed(self, device: torch.device) -> tuple[Int[Tensor, "n_segments length"], Bool[Tensor, "n_segments length"]]:
        """Each segment's positions (into the flattened ``batch * pos``), padded to the longest segment, and which
        entries are real: the segments as a batch of their own."""
        key = ("packed", str(device))
        if key not in self._dense:
            seg = self.segments.to(device)
            flat = (seg + torch.arange(seg.shape[0], device=device)[:, None] * (int(seg.max()) + 1)).flatten()
            where = (seg >= 0).flatten().nonzero().flatten()
            order = where[torch.sort(flat[where], stable=True).indices]
            _, counts = torch.unique_consecutive(flat[order], return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(order), device=device) - torch.repeat_interleave(starts, counts)
            group = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
            index = torch.zeros(len(counts), int(counts.max()), dtype=torch.long, device=device)
            valid = torch.zeros_like(index, dtype=torch.bool)
            index[group, slot], valid[group, slot] = order, True
            self._dense[key] = (index, valid)
        return self._dense[key]

    def padding(self, device: torch.device) -> Int[Tensor, " n_padding"]:
        """The padding positions (in no segment), into the flattened ``batch * pos``."""
        key = ("padding", str(device))
        if key not in self._dense:
            self._dense[key] = (self.segments.to(device) < 0).flatten().nonzero().flatten()
        return self._dense[key]

    def _spread_index(self, n_heads: int, device: torch.device
                      ) -> tuple[Optional[Int[Tensor, " n_real"]], Int[Tensor, " n_real"], Int[Tensor, " n_padding_heads"]]:
        """Where a packed ``[segment, head, length, length]`` map goes in a flattened dense ``[batch, head, pos,
        pos]`` map: which packed entries are real (both positions in the segment; None when all are), where each
        of those lies in the dense map, and where each padding position's diagonal lies (``[n_padding, head]``)."""
        key = ("spread", n_heads, str(device))
        if key not in self._dense:
            index, valid = self.packed(device)
            s, length = index.shape
            n = self.segments.shape[1]
            per_image, heads = n_heads * n * n, torch.arange(n_heads, device=device) * (n * n)
            at_q, at_k = index[:, :, None], index[:, None, :]
            at = ((at_q // n) * per_image + (at_q % n) * n + at_k % n)[:, None] + heads[None, :, None, None]
            real = None
            if not bool(valid.all()):
                real = (valid[:, None, :, None] & valid[:, None, None, :]).expand(at.shape).flatten().nonzero().flatten()
            pad = self.padding(device)
            at_pad = ((pad // n) * per_image + (pad % n) * (n + 1))[:, None] + heads[None, :]
            self._dense[key] = (real, at.flatten() if real is None else at.flatten()[real], at_pad.flatten())
        return self._dense[key]

    def spread(self, packed: Float[Tensor, "n_segments head length length"], fill: float,
               padding: Float[Tensor, "n_padding head"]) -> Float[Tensor, "batch head pos pos"]:
        """A packed per-segment map as the dense ``[batch, head, pos, pos]`` map: ``fill`` between positions of
        different segments and at padding, ``padding`` on the padding positions' diagonal."""
        h = packed.shape[1]
        b, n = self.segments.shape
        real, at, at_pad = self._spread_index(h, packed.device)
        flat = packed.reshape(-1)
        dense = packed.new_zeros((b, h, n, n)) if fill == 0 else packed.new_full((b, h, n, n), fill)
        dense.view(-1).index_copy_(0, at, flat if real is None else flat[real])
        if len(at_pad):
            dense.view(-1).index_copy_(0, at_pad, padding.to(packed.dtype).flatten())
        return dense

    def packing_saves_work(self, device: torch.device) -> bool:
        """Whether the packed segments cover at most half of the dense ``[batch, pos, pos]`` map (windows do;
        one segment per image with some padding does not)."""
        index, _ = self.packed(device)
        b, n = self.segments.shape
        return 2 * index.numel() * index.shape[1] <= b * n * n


class SegmentAttention(Attention):
    """:class:`Attention` that runs each segment of a :class:`SegmentMask` as a batch row of its own, on the SDPA
    path and on the eager path (hooked scores and pattern spread to their dense shape); both compute the same
    attention as the dense mask (tested against Hugging Face and against a dense masked softmax)."""

    def _packs(self, q: Tensor, k: Tensor, mask: AttentionMask) -> bool:
        """A vision tower's segment mask (no grouped keys, queries are the keys)."""
        return isinstance(mask, SegmentMask) and self.repeat == 1 and k.shape[2] == q.shape[2]

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        if not isinstance(mask, SegmentMask):
            return super()._sdpa(q, k, v, mask)
        if not self._packs(q, k, mask):  # not a vision tower's: the dense mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.shape[2], k.shape[2], q.device,
                                                                                   q.dtype), scale=self.scaling)
        qs, ks, vs, keys = self._pack(q, k, v, mask)
        z = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keys, scale=self.scaling)
        return self._unpack(z, v, mask)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if (not self._packs(q, k, mask) or self.softcap is not None or recording
                or not mask.packing_saves_work(q.device)):
            return super()._eager(q, k, v, mask)
        qs, ks, vs, keys = self._pack(q, k, v, mask)
        s, h, length, e = qs.shape  # scale and mask in one pass, as the dense path
        scores = torch.baddbmm(keys.expand(s, h, 1, length).reshape(s * h, 1, length), qs.reshape(-1, length, e),
                               ks.reshape(-1, length, e).transpose(1, 2), alpha=self.scaling).view(s, h, length, length)
        if watched(self.hook_attn_scores):
            changed = self._run_hook(self.hook_attn_scores,
                                     mask.spread(scores, float("-inf"), self._self_scores(q, k, mask)))
            if changed is not None:  # a hook changed the scores: they drive the rest, as on the dense path
                return self._weigh(changed, v)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        if watched(self.hook_pattern):
            alone = pattern.new_ones(len(mask.padding(q.device)), q.shape[1])  # padding attends to itself alone
            changed = self._run_hook(self.hook_pattern, mask.spread(pattern, 0.0, alone))
            if changed is not None:
                return changed @ v
        return self._unpack(pattern @ vs, v, mask)

    @staticmethod
    def _run_hook(hook, dense: Tensor) -> Optional[Tensor]:
        """``dense`` through ``hook``; what the hook passed on if it changed it (returned another tensor, or
        edited this one in place), else None."""
        version = dense._version
        seen = hook(dense)
        return seen if seen is not dense or dense._version != version else None

    def _self_scores(self, q: Tensor, k: Tensor, mask: SegmentMask) -> Float[Tensor, "n_padding head"]:
        """Each padding position's score with itself (the only key it sees), summed in float32."""
        pad = mask.padding(q.device)
        qp, kp = (_by_position(t)[pad].float() for t in (q, k))
        return (qp * kp).sum(-1) * self.scaling

    @staticmethod
    def _pack(q: Tensor, k: Tensor, v: Tensor, mask: SegmentMask):
        """``q``, ``k``, ``v`` ``[batch, head, pos, d_head]`` as ``[segment, head, length, d_head]``, and the
        additive key mask ``[segment, 1, 1, length]`` (-inf past a segment's end)."""
        index, valid = mask.packed(q.device)
        qs, ks, vs = (_by_position(t)[index].transpose(1, 2) for t in (q, k, v))
        keys = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
        return qs, ks, vs, keys[:, None, None, :]

    @staticmethod
    def _unpack(z: Float[Tensor, "n_segments head length d_head"], v: Float[Tensor, "batch head pos d_head"],
                mask: SegmentMask) -> Float[Tensor, "batch head pos d_head"]:
        """Each segment's output back at its positions; padding (in no segment) attends to itself alone: its own
        value."""
        b, h, n, e = v.shape
        index, valid = mask.packed(v.device)
        out = _by_position(v).clone()
        out[index[valid]] = z.transpose(1, 2)[valid]
        return out.view(b, n, h, e).transpose(1, 2)


def _by_position(t: Float[Tensor, "batch head pos d_head"]) -> Float[Tensor, "batch_pos head d_head"]:
    """Every position of every batch row in one dimension (the order :meth:`SegmentMask.packed` indexes)."""
    b, h, n, e = t.shape
    return t.transpose(1, 2).reshape(b * n, h, e)
