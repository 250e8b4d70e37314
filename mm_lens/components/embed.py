"""Token embedding and unembedding (TransformerLens names ``W_E``, ``W_U``, ``b_U``)."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class Unembed(nn.Module):
    """``x W_U + b_U``; with ``softcap`` (TransformerLens' ``output_logits_soft_cap``, Gemma 2/3's
    ``final_logit_softcapping``) the logits are then ``softcap * tanh(logits / softcap)``."""

    def __init__(self, d_model: int, d_vocab: int, softcap: Optional[float] = None):
        super().__init__()
        self.softcap = softcap
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab))
        self.b_U = nn.Parameter(torch.zeros(d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = torch.addmm(self.b_U, x.reshape(-1, x.shape[-1]), self.W_U).view(*x.shape[:-1], -1)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap
