"""Phi-3 text tower (Hugging Face ``Phi3Model``, model_type ``phi3``).

Llama-like (RMSNorm, gated SiLU MLP, no biases) with fused projections: ``qkv_proj`` stacks the
query, key and value rows, ``gate_up_proj`` the gate and up rows; the key table slices them
with the transforms below. Partial rotary (``partial_rotary_factor``) is honoured.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mm_lens.conversion.common import (
    ZERO,
    Rule,
    sliding_window,
    split_heads_in,
    split_heads_out,
    split_kv_heads_in,
    transpose,
)
from mm_lens.conversion.phi import partial_rotary_factor, rope_base

MODEL_TYPE = "phi3"


def _qkv_rows(t: Tensor, dims: Mapping[str, int], part: str) -> Tensor:
    n_q, n_kv = dims["n_heads"], dims["n_kv_heads"]
    d_head = t.shape[0] // (n_q + 2 * n_kv)
    q, k = n_q * d_head, n_kv * d_head
    return {"q": t[:q], "k": t[q:q + k], "v": t[q + k:]}[part]


def fused_qkv(part: str, then):
    """Rows of ``part`` (q, k or v) of a fused ``qkv_proj`` weight, then ``then`` (a head split)."""
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        return then(_qkv_rows(t, dims, part), dims)

    fn.__name__ = f"fused_qkv[{part}]>{then.__name__}"
    return fn


def fused_half(index: int):
    """First (gate) or second (up) half of the rows of ``gate_up_proj``, transposed to ``[d_model, d_mlp]``."""
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        return t.chunk(2, dim=0)[index].T

    fn.__name__ = f"fused_half[{index}]"
    return fn


def translate_text_config(tc) -> dict:
    n_heads = tc.num_attention_heads
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads, d_head=d_head,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size,
        n_key_value_heads=getattr(tc, "num_key_value_heads", None) or n_heads, n_ctx=tc.max_position_embeddings,
        act_fn=tc.hidden_act, normalization_type="RMS", eps=tc.rms_norm_eps, gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=int(d_head * partial_rotary_factor(tc)),
        rotary_base=rope_base(tc),
        extra=dict(text_model_type=MODEL_TYPE), **sliding_window(tc),
    )


def text_rules(cfg) -> list[Rule]:
    a = "layers.{l}.self_attn."
    m = "layers.{l}.mlp."
    return [
        Rule("embed.W_E", "embed_tokens.weight"),
        Rule("blocks.{l}.ln1.w", "layers.{l}.input_layernorm.weight"),
        Rule("blocks.{l}.attn.W_Q", a + "qkv_proj.weight", fused_qkv("q", split_heads_in)),
        Rule("blocks.{l}.attn._W_K", a + "qkv_proj.weight", fused_qkv("k", split_kv_heads_in)),
        Rule("blocks.{l}.attn._W_V", a + "qkv_proj.weight", fused_qkv("v", split_kv_heads_in)),
        Rule("blocks.{l}.attn.W_O", a + "o_proj.weight", split_heads_out),
        Rule("blocks.{l}.attn.b_Q", ZERO),
        Rule("blocks.{l}.attn._b_K", ZERO),
        Rule("blocks.{l}.attn._b_V", ZERO),
        Rule("blocks.{l}.attn.b_O", ZERO),
        Rule("blocks.{l}.ln2.w", "layers.{l}.post_attention_layernorm.weight"),
        Rule("blocks.{l}.mlp.W_gate", m + "gate_up_proj.weight", fused_half(0)),
        Rule("blocks.{l}.mlp.W_in", m + "gate_up_proj.weight", fused_half(1)),
        Rule("blocks.{l}.mlp.b_in", ZERO),
        Rule("blocks.{l}.mlp.W_out", m + "down_proj.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", ZERO),
        Rule("ln_final.w", "norm.weight"),
    ]
