"""Gemma text tower (Hugging Face ``GemmaModel``, model_type ``gemma``).

Llama-like with three differences, all absorbed into the weights at conversion (as TransformerLens
does): token embeddings are scaled by ``sqrt(d_model)`` (so ``W_E`` is stored scaled, while the tied
``W_U`` keeps the unscaled matrix), RMSNorm multiplies by ``1 + weight`` (so ``w`` is stored as
``1 + weight``), and the gated MLP uses GELU (tanh) — GeGLU — which the gated MLP takes as ``act_fn``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from mm_lens.conversion.common import Rule

MODEL_TYPE = "gemma"


def plus_one(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    """Gemma RMSNorm weight ``w`` -> the multiplier ``1 + w``."""
    return t.float() + 1.0


def scaled_by(factor: float):
    """Embedding matrix times the (float32) normaliser ``sqrt(d_model)``, as Gemma's embedding applies it."""
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        return t * torch.tensor(factor, dtype=t.dtype)

    fn.__name__ = f"scaled_by[{factor:.4g}]"
    return fn


def text_rules(cfg, llama_rules: list[Rule]) -> list[Rule]:
    """Llama's table with the embedding scaled and every norm weight shifted by one."""
    out = []
    for rule in llama_rules:
        if rule.target == "embed.W_E":
            rule = Rule(rule.target, rule.source, scaled_by(math.sqrt(cfg.d_model)))
        elif rule.target.endswith((".ln1.w", ".ln2.w")) or rule.target == "ln_final.w":
            rule = Rule(rule.target, rule.source, plus_one)
        out.append(rule)
    return out
