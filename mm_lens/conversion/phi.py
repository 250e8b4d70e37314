"""Phi-2 text tower (Hugging Face ``PhiModel``, model_type ``phi``).

Parallel blocks (attention and MLP both read the one ``input_layernorm``: TL's
``parallel_attn_mlp``, with ``ln2`` holding a copy of ``ln1``), partial rotary
(``partial_rotary_factor``), biases on q/k/v/dense/fc1/fc2, LayerNorm with bias, a final
LayerNorm and an ``lm_head`` with bias.
"""

from __future__ import annotations

from mm_lens.conversion.common import Rule, attention_rules, transpose

MODEL_TYPE = "phi"
LM_HEAD_BIAS = True


def partial_rotary_factor(tc) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0) or 1.0))


def rope_base(tc) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(tc, "rope_theta", None) or 10000.0))


def translate_text_config(tc) -> dict:
    """TransformerLens fields of a ``PhiConfig``."""
    if getattr(tc, "qk_layernorm", False):
        raise ValueError("Phi with qk_layernorm=True is not supported (TransformerLens has no slot for it)")
    n_heads = tc.num_attention_heads
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=n_heads, d_head=d_head,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size,
        n_key_value_heads=getattr(tc, "num_key_value_heads", None) or n_heads,
        n_ctx=tc.max_position_embeddings, act_fn=tc.hidden_act, normalization_type="LN", eps=tc.layer_norm_eps,
        gated_mlp=False, attn_bias=True, mlp_bias=True, parallel_attn_mlp=True, final_rms=False,
        positional_embedding_type="rotary", rotary_dim=int(d_head * partial_rotary_factor(tc)),
        rotary_base=rope_base(tc), extra=dict(text_model_type=MODEL_TYPE),
    )


def text_rules(cfg) -> list[Rule]:
    """Key table relative to the text tower's prefix (``model.`` in ``PhiForCausalLM``)."""
    a = "layers.{l}.self_attn."
    m = "layers.{l}.mlp."
    ln = "layers.{l}.input_layernorm."
    return [
        Rule("embed.W_E", "embed_tokens.weight"),
        Rule("blocks.{l}.ln1.w", ln + "weight"),
        Rule("blocks.{l}.ln1.b", ln + "bias"),
        Rule("blocks.{l}.ln2.w", ln + "weight"),  # the one LayerNorm feeds the MLP too
        Rule("blocks.{l}.ln2.b", ln + "bias"),
        *attention_rules(a, out="dense"),
        Rule("blocks.{l}.mlp.W_in", m + "fc1.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", m + "fc1.bias"),
        Rule("blocks.{l}.mlp.W_out", m + "fc2.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", m + "fc2.bias"),
        Rule("ln_final.w", "final_layernorm.weight"),
        Rule("ln_final.b", "final_layernorm.bias"),
    ]
