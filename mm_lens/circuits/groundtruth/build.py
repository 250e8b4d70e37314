"""Construction helpers for models whose mechanism is fixed by hand: a tiny random LLaVA made silent
(no head or MLP writes anything), then given exactly the heads, MLPs and unembedding a mechanism needs.

Residual-stream layout of the suite's models (``d_model`` 48): marker dims (``OBJECT``, ``DISTRACTOR``,
``QUERY``, ``SUBJECT``, ``SINK``), payload subspace ``A`` (12 dims = ``d_head``: what the answer is),
a second subspace ``B`` (12 dims: a relay, token identities, or a subspace nothing reads), and filler
dims with random content. Corruptions swap one payload for another of the same norm, so no norm
(RMSNorm) changes between the clean and the corrupted run and every edge outside the mechanism has
exactly no effect.
"""

from __future__ import annotations

import torch

from mm_lens.model import HookedVLM
from mm_lens.testing import tiny_llava

EXACT = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
OBJECT, DISTRACTOR, QUERY, SUBJECT, SINK = 0, 1, 2, 3, 4
A = slice(8, 20)
B = slice(20, 32)
FILLER = slice(32, 48)
MARK = 3.0  # marker size
PAYLOAD_NORM = 3.0
FILLER_NORM = 4.0


def hooked(seed: int = 0, **kw) -> HookedVLM:
    """A tiny random LLaVA as a HookedVLM without weight processing (Hugging Face's exact activations)."""
    hf, proc = tiny_llava(seed=seed, **kw)
    return HookedVLM.from_hf(hf, proc, **EXACT)


@torch.no_grad()
def unit_norms(model: HookedVLM) -> None:
    """Every language-model norm weight 1 (RMSNorm only rescales)."""
    for norm in [model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
        if getattr(norm, "w", None) is not None:
            norm.w.fill_(1.0)


@torch.no_grad()
def silent(seed: int = 0, **kw) -> HookedVLM:
    """A tiny LLaVA whose language model computes nothing yet: rotary off (attention by content only), norm
    weights 1, every head and MLP silent (all attention and MLP weights and biases zero), token embeddings
    random in the filler dims only, unembedding zero."""
    model = hooked(seed, **kw)
    model.rotary.inv_freq.zero_()
    unit_norms(model)
    for block in model.blocks:
        for p in list(block.attn.parameters()) + list(block.mlp.parameters()):
            p.zero_()
    g = torch.Generator().manual_seed(seed + 100)
    W_E = torch.zeros_like(model.W_E)
    filler = torch.randn(W_E.shape[0], FILLER.stop - FILLER.start, generator=g)
    W_E[:, FILLER] = filler / filler.norm(dim=-1, keepdim=True) * FILLER_NORM  # every token the same norm
    W_E[model.tokenizer.bos_token_id, SINK] = MARK
    model.embed.W_E.copy_(W_E)
    model.unembed.W_U.zero_()
    model.unembed.b_U.zero_()
    return model


@torch.no_grad()
def mark_token(model: HookedVLM, word: str, dim: int, value: float = MARK) -> int:
    """Put a marker (or an identity) in the embedding of ``word``; returns its token id."""
    token = model.to_single_token(word)
    model.embed.W_E[token, dim] = value
    return token


@torch.no_grad()
def copy_head(model: HookedVLM, layer: int, head: int, query: int, key: int, source: slice, target: slice,
              gain: float = 1.0, strength: float = 6.0, sink: float = 5.0) -> None:
    """Head ``(layer, head)`` attends from positions with marker ``query`` to positions with marker ``key``
    and copies subspace ``source`` there into subspace ``target`` (times ``gain``). Positions without the
    query marker attend to BOS (the ``SINK`` marker), whose ``source`` is empty: they write nothing."""
    attn = model.blocks[layer].attn
    kv = head // attn.repeat
    attn.W_Q[head, query, 0] = strength
    attn.b_Q[head, 1] = sink
    attn._W_K[kv, key, 0] = strength
    attn._W_K[kv, SINK, 1] = sink
    n = source.stop - source.start
    attn._W_V[kv, source, :n] = torch.eye(n)
    attn.W_O[head, :n, target] = torch.eye(n) * gain


@torch.no_grad()
def lookup_mlp(model: HookedVLM, layer: int, keys: list[int], values: list[torch.Tensor], gain: float = 4.0) -> None:
    """MLP ``layer`` writes ``values[i]`` at positions whose (normalised) residual has a positive entry in
    dim ``keys[i]`` (one hidden unit per key; gated ``silu(gate) * up`` as Llama's MLP)."""
    mlp = model.blocks[layer].mlp
    for unit, (dim, value) in enumerate(zip(keys, values)):
        mlp.W_gate[dim, unit] = gain
        mlp.W_in[dim, unit] = 1.0
        mlp.W_out[unit] = value
    mlp.b_out.zero_()


def directions(n: int, dims: slice, seed: int, norm: float = PAYLOAD_NORM) -> list[torch.Tensor]:
    """``n`` random vectors of norm ``norm`` in the subspace ``dims`` of the residual stream (48 dims)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.zeros(48)
        v[dims] = torch.randn(dims.stop - dims.start, generator=g)
        out.append(v / v.norm() * norm)
    return out
