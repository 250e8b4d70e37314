"""Past keys and values: what a forward over new positions needs from the positions before them.

As TransformerLens' ``HookedTransformerKeyValueCache``: one entry per layer holding the keys
(after rotary) and values every earlier position produced, plus the attention mask and position
ids of those positions. A forward given a cache runs only the new positions (its hooks see only
them) and appends their keys and values; a frozen cache is read but never grows, so several
continuations can share one prefix. Cached generation and the fast patching engine (which resumes
a run at layer L on a suffix of positions) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _concat(past: Tensor, new: Tensor, dim: int) -> Tensor:
    """``past`` then ``new`` along ``dim``; a ``past`` whose batch divides ``new``'s is shared by every
    copy of a batch repeated ``new.shape[0] // past.shape[0]`` times (one copy of the prefix in memory)."""
    if past.shape[0] == new.shape[0]:
        return torch.cat([past, new.to(past.dtype)], dim=dim)
    repeat, batch = new.shape[0] // past.shape[0], past.shape[0]
    if repeat * batch != new.shape[0]:
        raise ValueError(f"a cache of batch {batch} cannot serve a batch of {new.shape[0]}")
    shape = list(new.shape)
    shape[dim] += past.shape[dim]
    out = new.new_empty(shape)
    out.narrow(dim, past.shape[dim], new.shape[dim]).copy_(new)
    out.view(repeat, batch, *shape[1:]).narrow(dim + 1, 0, past.shape[dim]).copy_(past.unsqueeze(0).expand(
        repeat, *past.shape))
    return out


@dataclass
class KVCacheEntry:
    """One layer's keys (after rotary) and values ``[batch, kv_head, pos, d_head]``."""

    keys: Optional[Float[Tensor, "batch kv_head pos d_head"]] = None
    values: Optional[Float[Tensor, "batch kv_head pos d_head"]] = None
    frozen: bool = False

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The cached keys/values followed by the new ones (stored unless frozen)."""
        if self.keys is not None:
            keys, values = _concat(self.keys, keys, 2), _concat(self.values, values, 2)
        if not self.frozen:
            self.keys, self.values = keys, values
        return keys, values


@dataclass
class KVCache:
    """Per-layer :class:`KVCacheEntry` plus the attention mask (1 = real token) and position ids of the
    cached positions. ``KVCache.empty(n_layers)`` before a first forward; pass it to every later one."""

    entries: list[KVCacheEntry]
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None
    position_ids: Optional[Int[Tensor, "... batch pos"]] = None  # position ids may carry leading axes (M-RoPE)
    frozen: bool = False
    meta: dict = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([KVCacheEntry() for _ in range(n_layers)])

    def __getitem__(self, layer: int) -> KVCacheEntry:
        return self.entries[layer]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_pos(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def freeze(self) -> "KVCache":
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True
        return self

    def mask_with(self, attention_mask: Tensor) -> Tensor:
        """The attention mask of the cached positions followed by ``attention_mask`` (of the new ones)."""
        return attention_mask if self.attention_mask is None else _concat(self.attention_mask, attention_mask, 1)

    def extend(self, attention_mask: Tensor, position_ids: Tensor) -> None:
        """Record the attention mask and position ids of new positions (nothing when frozen)."""
        if self.frozen:
            return
        self.attention_mask = self.mask_with(attention_mask)
        self.position_ids = position_ids if self.position_ids is None else \
            torch.cat([self.position_ids, position_ids], dim=-1)

    def prefix(self, n: int) -> "KVCache":
        """A frozen view of the first ``n`` positions (no copy), e.g. to resume a run on positions ``n..``."""
        entries = [KVCacheEntry(e.keys[:, :, :n], e.values[:, :, :n], frozen=True) for e in self.entries]
        pos = None if self.position_ids is None else self.position_ids[..., :n]
        return KVCache(entries, self.attention_mask[:, :n], pos, frozen=True)
