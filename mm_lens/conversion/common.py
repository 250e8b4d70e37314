"""Shared machinery for strict, declarative weight conversion.

A family describes its checkpoint as a table of :class:`Rule`: which source key fills
which HookedVLM parameter, through which shared transform. :func:`plan_strict` checks a
table against the checkpoint's headers before any tensor is read and refuses unless every
source key is used, every parameter filled and every shape matches; the error lists every
offender. Each :class:`Fill` then reads its one tensor when the conversion reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from mm_lens.conversion.checkpoint import Checkpoint, as_checkpoint

# ---------------------------------------------------------------- transforms
# Each takes (tensor, dims) where dims holds n_heads / n_kv_heads / d_head of the stack in question.


def identity(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    return t


def transpose(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    """``nn.Linear`` weight ``[out, in]`` -> ``[in, out]``."""
    return t.T


def _split_in(heads_key: str):
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        n = dims[heads_key]
        return t.reshape(n, -1, t.shape[-1]).transpose(1, 2)  # [n*d_head, d_model] -> [n, d_model, d_head]

    fn.__name__ = f"split_heads_in[{heads_key}]"
    return fn


def _split_bias(heads_key: str):
    def fn(t: Tensor, dims: Mapping[str, int]) -> Tensor:
        return t.reshape(dims[heads_key], -1)

    fn.__name__ = f"split_heads_bias[{heads_key}]"
    return fn


def split_heads_out(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    """Output projection ``[d_model, n*d_head]`` -> ``[n, d_head, d_model]``."""
    return t.T.reshape(dims["n_heads"], -1, t.shape[0])


split_heads_in = _split_in("n_heads")
split_kv_heads_in = _split_in("n_kv_heads")
split_heads_bias = _split_bias("n_heads")
split_kv_heads_bias = _split_bias("n_kv_heads")


def flatten(t: Tensor, dims: Mapping[str, int]) -> Tensor:
    return t.reshape(-1)


ZERO = "<zero>"  # a parameter the source does not have (e.g. absent biases): filled with zeros


@dataclass(frozen=True)
class Rule:
    """``target`` (HookedVLM parameter) <- ``transform(source)``; ``{l}`` stands for the layer index."""

    target: str
    source: str
    transform: Callable[[Tensor, Mapping[str, int]], Tensor] = identity


def expand(rules: Iterable[Rule], n_layers: int, target_prefix: str, source_prefix: str) -> list[Rule]:
    """Prefix the keys and unroll ``{l}`` over layers."""
    out = []
    for r in rules:
        layers = range(n_layers) if "{l}" in r.target else [None]
        for l in layers:
            target = target_prefix + r.target.format(l=l)
            source = r.source if r.source == ZERO else source_prefix + r.source.format(l=l)
            out.append(Rule(target, source, r.transform))
    return out


@dataclass(frozen=True)
class Fill:
    """How one parameter is filled: ``transform(source[key], dims)`` (or zeros), checked to give ``shape``."""

    target: str
    key: str
    transform: Callable[[Tensor, Mapping[str, int]], Tensor]
    dims: Mapping[str, int]
    shape: tuple[int, ...]

    def read(self, source: Mapping[str, Tensor], dtype: torch.dtype, device="cpu") -> Tensor:
        """This parameter's value as a new tensor in ``dtype`` on ``device`` (one source tensor read, moved in
        its own dtype, transformed there, converted)."""
        if self.key == ZERO:
            return torch.zeros(self.shape, dtype=dtype, device=device)
        raw = source[self.key]
        source_ptr = raw.untyped_storage().data_ptr()
        value = self.transform(raw.to(device), self.dims)
        del raw  # from here only ``value`` keeps the source's pages (a mapped file) alive
        value = value.contiguous()  # a transpose is far cheaper before the dtype changes than during
        if value.dtype != dtype:
            return value.to(dtype)
        # never an alias of the source (a mapped file, a user's model in memory): processing works in place
        return value.clone() if value.untyped_storage().data_ptr() == source_ptr else value


def plan_strict(
    shapes: Mapping[str, tuple[int, ...]],
    source: Mapping[str, Tensor],
    rules: list[tuple[Rule, Mapping[str, int]]],
    ignore_source: Iterable[str] = (),
    family: str = "",
) -> dict[str, Fill]:
    """Check ``rules`` against a checkpoint before reading any tensor data, strict in all three directions.

    ``shapes``: every parameter to fill and its shape. Source shapes come from the checkpoint's headers and
    the transforms run on meta tensors, so a missing, unexpected or mis-shaped tensor is found up front; the
    ValueError lists every offender. Returns ``{parameter: Fill}``.
    """
    source = as_checkpoint(source)
    used, targeted, plan, problems = set(), set(), {}, []
    for rule, dims in rules:
        if rule.target not in shapes:
            problems.append(f"rule targets {rule.target!r}, which the model does not have")
            continue
        targeted.add(rule.target)
        expected = tuple(shapes[rule.target])
        if rule.source == ZERO:
            plan[rule.target] = Fill(rule.target, ZERO, identity, dims, expected)
            continue
        if rule.source not in source:
            problems.append(f"missing source key {rule.source!r} (for {rule.target})")
            continue
        used.add(rule.source)
        got = _transformed_shape(rule, dims, source)
        if got != expected:
            problems.append(
                f"shape mismatch for {rule.target}: expected {expected}, got {got} from {rule.source!r} "
                f"{tuple(source.shape(rule.source))} via {getattr(rule.transform, '__name__', '?')}"
            )
            continue
        plan[rule.target] = Fill(rule.target, rule.source, rule.transform, dims, expected)
    ignore = set(ignore_source)
    unused = sorted(k for k in source if k not in used and k not in ignore)
    unfilled = sorted(k for k in shapes if k not in targeted)
    if unused:
        problems.append(f"unexpected source keys (not used by the {family} key table): {unused}")
    if unfilled:
        problems.append(f"parameters left unfilled: {unfilled}")
    if problems:
        raise ValueError(f"cannot convert this {family} checkpoint:\n  - " + "\n  - ".join(problems))
    return plan


def _transformed_shape(rule: Rule, dims: Mapping[str, int], source: Checkpoint):
    """The transform applied to a meta tensor of the source's shape: a shape, or a sentence why not."""
    meta = torch.empty(source.shape(rule.source), dtype=source.dtype(rule.source), device="meta")
    try:
        return tuple(rule.transform(meta, dims).shape)
    except (RuntimeError, ValueError, IndexError) as err:
        return f"an error ({str(err).splitlines()[0]})"


def load_strict(
    model: torch.nn.Module,
    source: Mapping[str, Tensor],
    rules: list[tuple[Rule, Mapping[str, int]]],
    ignore_source: Iterable[str] = (),
    family: str = "",
) -> None:
    """Fill every parameter of a model in memory from ``source`` by ``rules`` (checked by :func:`plan_strict`)."""
    params = dict(model.named_parameters())
    plan = plan_strict({k: tuple(p.shape) for k, p in params.items()}, source, rules, ignore_source, family)
    with torch.no_grad():
        for name, fill in plan.items():
            params[name].copy_(fill.read(source, params[name].dtype))


def attention_rules(prefix: str, out: str = "o_proj", bias: bool = True, out_bias: Optional[bool] = None) -> list[Rule]:
    """The eight attention parameters of a layer from separate ``q_proj``/``k_proj``/``v_proj``/``{out}``
    projections under ``prefix``; absent biases (``bias``/``out_bias`` False) are filled with zeros."""
    out_bias = bias if out_bias is None else out_bias

    def src(name: str, present: bool) -> str:
        return prefix + name if present else ZERO

    return [
        Rule("blocks.{l}.attn.W_Q", prefix + "q_proj.weight", split_heads_in),
        Rule("blocks.{l}.attn._W_K", prefix + "k_proj.weight", split_kv_heads_in),
        Rule("blocks.{l}.attn._W_V", prefix + "v_proj.weight", split_kv_heads_in),
        Rule("blocks.{l}.attn.W_O", prefix + out + ".weight", split_heads_out),
        Rule("blocks.{l}.attn.b_Q", src("q_proj.bias", bias), split_heads_bias),
        Rule("blocks.{l}.attn._b_K", src("k_proj.bias", bias), split_kv_heads_bias),
        Rule("blocks.{l}.attn._b_V", src("v_proj.bias", bias), split_kv_heads_bias),
        Rule("blocks.{l}.attn.b_O", src(out + ".bias", out_bias)),
    ]


def vit_encoder_layer_rules(prefix: str = "encoder.layers.{l}.") -> list[Rule]:
    """One pre-norm layer of Hugging Face's CLIP-style ViT encoder (CLIP and SigLIP share it)."""
    return [
        Rule("blocks.{l}.ln1.w", prefix + "layer_norm1.weight"),
        Rule("blocks.{l}.ln1.b", prefix + "layer_norm1.bias"),
        *attention_rules(prefix + "self_attn.", out="out_proj"),
        Rule("blocks.{l}.ln2.w", prefix + "layer_norm2.weight"),
        Rule("blocks.{l}.ln2.b", prefix + "layer_norm2.bias"),
        Rule("blocks.{l}.mlp.W_in", prefix + "mlp.fc1.weight", transpose),
        Rule("blocks.{l}.mlp.b_in", prefix + "mlp.fc1.bias"),
        Rule("blocks.{l}.mlp.W_out", prefix + "mlp.fc2.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", prefix + "mlp.fc2.bias"),
    ]


# ---------------------------------------------------------------- config translation shared by families
def sliding_window(tc) -> dict:
    """TransformerLens' local-attention fields for a Hugging Face text config's sliding window: Mistral and
    Phi-3 slide in every layer, Qwen2 (and Gemma 3) in the layers ``layer_types`` calls ``sliding_attention``."""
    window = getattr(tc, "sliding_window", None)
    if not window:
        return {}
    types = getattr(tc, "layer_types", None)
    if types is None or tc.model_type in ("mistral", "phi3"):  # Mistral warns that it ignores layer_types
        types = ["sliding_attention"] * tc.num_hidden_layers
    if "sliding_attention" not in types:
        return {}
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    unknown = sorted(set(types) - set(kinds))
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (supported: {sorted(kinds)})")
    return dict(use_local_attn=True, window_size=int(window), attn_types=tuple(kinds[t] for t in types))
