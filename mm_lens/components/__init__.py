"""Hooked building blocks: norms, attention, MLP, rotary, embeddings, blocks, vision tower, projector."""

from mm_lens.components.attention import Attention, AttentionMask
from mm_lens.components.block import Block
from mm_lens.components.embed import Embed, Unembed
from mm_lens.components.kv_cache import KVCache, KVCacheEntry
from mm_lens.components.mlp import MLP
from mm_lens.components.norms import Norm, make_norm
from mm_lens.components.projector import Projector
from mm_lens.components.rotary import Rotary, apply_rotary
from mm_lens.components.vision import VisionEncoder

__all__ = [
    "Attention", "AttentionMask", "Block", "Embed", "Unembed", "KVCache", "KVCacheEntry", "MLP", "Norm", "make_norm",
    "Projector", "Rotary", "apply_rotary", "VisionEncoder",
]
