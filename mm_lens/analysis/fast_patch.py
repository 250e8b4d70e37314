"""The fast patching engine: resume at layer L, recompute only the suffix of positions.

A patch at layer L and positions ``>= start`` leaves every layer below L and every position
below ``start`` unchanged (causal attention), and leaves the vision tower untouched. So a
patched run starts from the cached residual of the base run at layer L, keeps the base run's
keys and values of positions ``< start`` in every later layer, recomputes positions
``start..n-1`` only, and unembeds only the positions the metric reads.

:func:`capture` records what a base run needs; :func:`run_patched` runs one patch. Sites
that can be patched: ``resid_pre``, ``attn_out``, ``resid_mid``, ``mlp_out``, ``resid_post``,
``mlp_post``, and per head ``z``, ``q``, ``k``, ``v`` (before rotary, as ``hook_q/k/v``) and
``pattern``. A patch is a function on the suffix activation (positions ``start..n-1``, batch
first; for ``pattern`` the query rows ``start..n-1`` of ``[batch, head, query, key]``)
returning the patched activation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mm_lens.components.attention import AttentionMask
from mm_lens.components.rotary import apply_rotary
from mm_lens.inputs import MultimodalInput

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "mlp_post", "z", "q", "k", "v", "pattern")
PatchFn = Callable[[Tensor], Tensor]


@dataclass
class BaseRun:
    """What a patched run reuses from its base run (the run being patched into)."""

    inputs: MultimodalInput
    resid_pre: list[Tensor]  # per layer [batch, pos, d_model]
    keys: list[Tensor]  # per layer [batch, kv_head, pos, d_head], after rotary
    values: list[Tensor]  # per layer [batch, kv_head, pos, d_head]
    final: Tensor  # [batch, pos, d_model]: the residual before ln_final
    mask: AttentionMask
    rotary: Optional[tuple[Tensor, Tensor]]  # cos, sin [batch, pos, 1, rot]
    last: Tensor  # [batch]: last prompt position of each row
    extra: dict = field(default_factory=dict, repr=False)  # further activations asked for in capture()
    float_masks: dict = field(default_factory=dict, repr=False)


def _hooks_context(model, fwd_hooks):
    return model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else nullcontext()


@torch.no_grad()
def capture(model, inputs: MultimodalInput, fwd_hooks: Sequence = (), extra: Sequence[str] = ()
            ) -> tuple[BaseRun, Tensor]:
    """Run ``inputs`` once (with ``fwd_hooks``, e.g. an embedding corruption) and keep what patches reuse.

    Returns ``(base, logits)``. Hooks must act at ``hook_embed`` or earlier: later layers are
    recomputed without them. ``extra``: further hook names to keep (in ``base.extra``).
    """
    L = model.cfg.n_layers
    rot = model.rotary is not None
    key_name = "attn.hook_rot_k" if rot else "attn.hook_k"
    wanted = {f"blocks.{l}.{s}" for l in range(L) for s in ("hook_resid_pre", key_name, "attn.hook_v")}
    wanted.add(f"blocks.{L - 1}.hook_resid_post")
    wanted.update(extra)
    with _hooks_context(model, fwd_hooks):
        logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n in wanted, return_cache_object=False)
    dtype = cache["blocks.0.hook_resid_pre"].dtype
    rotary = model.rotary(model.position_ids(inputs.attention_mask), dtype) if rot else None
    base = BaseRun(
        inputs=inputs,
        resid_pre=[cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)],
        keys=[cache[f"blocks.{l}.{key_name}"].transpose(1, 2) for l in range(L)],
        values=[cache[f"blocks.{l}.attn.hook_v"].transpose(1, 2) for l in range(L)],
        final=cache[f"blocks.{L - 1}.hook_resid_post"],
        mask=model.attention_mask(inputs),
        rotary=rotary,
        last=inputs.positions.last_positions.to(logits.device),
        extra={name: cache[name] for name in extra},
    )
    return base, logits


def _additive_mask(base: "BaseRun", n_q: int, n_k: int, device) -> Optional[Tensor]:
    """Float mask (0 / -inf) for ``n_q`` queries ending at key ``n_k - 1`` (SDPA runs faster with it than
    with bools): rows of one full-length mask, built once."""
    if "full" not in base.float_masks:
        n = base.final.shape[1]
        dense = base.mask.dense(n, n, device)
        base.float_masks["full"] = None if dense is None else \
            torch.zeros(dense.shape, dtype=base.final.dtype, device=device).masked_fill(~dense, float("-inf"))
    full = base.float_masks["full"]
    return None if full is None else full[..., n_k - n_q:n_k, :n_k]


def _rep(t: Optional[Tensor], k: int, broadcast: bool = True) -> Optional[Tensor]:
    """``t`` repeated ``k`` times along the batch (left as is where a batch of 1 broadcasts)."""
    if t is None or k == 1 or (broadcast and t.shape[0] == 1):
        return t
    return t.repeat(k, *([1] * (t.ndim - 1)))


def _attention_suffix(attn, x: Tensor, k_prefix: Tensor, v_prefix: Tensor, base: "BaseRun",
                      start: int, patches: dict, q_from: int = 0, k: int = 1) -> Tensor:
    """Attention output for suffix rows ``q_from..`` (keys/values: cached prefix + the whole suffix);
    ``patches``: this layer's, by site."""
    n_rep = k
    k = _apply(patches, "k", attn._project(x, attn._W_K, attn._b_K))
    v = _apply(patches, "v", attn._project(x, attn._W_V, attn._b_V))
    q = _apply(patches, "q", attn._project(x[:, q_from:], attn.W_Q, attn.b_Q))
    if attn.use_rotary:
        cos, sin = _rep(base.rotary[0][:, start:], n_rep), _rep(base.rotary[1][:, start:], n_rep)
        q, k = apply_rotary(q, cos[:, q_from:], sin[:, q_from:]), apply_rotary(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
    k = torch.cat([_rep(k_prefix, n_rep, False), k], dim=2)
    v = torch.cat([_rep(v_prefix, n_rep, False), v], dim=2)
    mask = _rep(_additive_mask(base, q.shape[2], k.shape[2], q.device), n_rep)
    if "pattern" in patches:  # the pattern itself is patched: materialise it
        if attn.repeat > 1:
            k, v = k.repeat_interleave(attn.repeat, dim=1), v.repeat_interleave(attn.repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.d_head**-0.5
        if mask is not None:
            scores = scores + mask
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = patches["pattern"](pattern) @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.repeat > 1)
    z = _apply(patches, "z", z.transpose(1, 2))  # [batch, pos, head, d_head]
    flat_O = attn.W_O.reshape(-1, attn.W_O.shape[-1])
    return torch.addmm(attn.b_O, z.reshape(-1, flat_O.shape[0]), flat_O).view(*z.shape[:2], -1)


def _mlp(mlp, x: Tensor, patch: Optional[PatchFn]) -> Tensor:
    """The MLP on the suffix, with ``patch`` applied to ``hook_post`` (held only for this call)."""
    if patch is None:
        return mlp(x)
    handle = mlp.hook_post.register_forward_hook(lambda module, args, out: patch(out))
    try:
        return mlp(x)
    finally:
        handle.remove()


def _apply(patches: dict, site: str, x: Tensor) -> Tensor:
    fn = patches.get(site)
    return x if fn is None else fn(x)


@torch.no_grad()
def run_patched(model, base: BaseRun, layer: int, start: int, patches: dict[tuple[int, str], PatchFn],
                logits: str = "last", repeat: int = 1) -> Float[Tensor, "batch pos d_vocab"]:
    """Resume the base run at ``layer`` for positions ``start..n-1`` with ``patches[(layer, site)]`` applied.

    ``repeat=k`` runs k copies of the base batch at once (several patches per forward): the
    patches then see ``k * batch`` rows, copy j in rows ``j*batch..(j+1)*batch-1``.

    ``logits="last"``: logits at each row's last prompt position, shaped ``[batch, 1, d_vocab]``;
    ``"all"``: every position, ``[batch, pos, d_vocab]`` (positions < start from the base run).
    """
    bad = [s for _, s in patches if s not in SITES]
    if bad:
        raise ValueError(f"the fast engine patches {SITES}, not {bad}")
    if any(l < layer for l, _ in patches):
        raise ValueError(f"patches at layers {sorted(l for l, _ in patches)} lie below the start layer {layer}")
    x = _rep(base.resid_pre[layer][:, start:], repeat, False)
    L = model.cfg.n_layers
    n = base.final.shape[1]
    # the last layer computes only the last row when that is all the logits need (no padding on the right)
    last_only = logits == "last" and bool((base.last == n - 1).all()) and not any(l == L - 1 for l, _ in patches)
    for l in range(layer, L):
        block = model.blocks[l]
        here = {site: fn for (pl, site), fn in patches.items() if pl == l}
        q_from = x.shape[1] - 1 if last_only and l == L - 1 else 0
        x = _apply(here, "resid_pre", x)
        attn_out = _attention_suffix(block.attn, block.ln1(x), base.keys[l][:, :, :start],
                                     base.values[l][:, :, :start], base, start, here, q_from, repeat)
        x = x[:, q_from:]
        attn_out = _apply(here, "attn_out", attn_out)
        if getattr(block, "parallel", False):  # resid_post = resid_pre + attn + mlp(ln2(resid_pre))
            mlp_out = _apply(here, "mlp_out", _mlp(block.mlp, block.ln2(x), here.get("mlp_post")))
            x = _apply(here, "resid_post", x + attn_out + mlp_out)
            continue
        mid = _apply(here, "resid_mid", x + attn_out)
        mlp_out = _apply(here, "mlp_out", _mlp(block.mlp, block.ln2(mid), here.get("mlp_post")))
        x = _apply(here, "resid_post", mid + mlp_out)
    if last_only:
        return model.unembed(model.ln_final(x))
    base_final, last = _rep(base.final, repeat, False), _rep(base.last, repeat, False)
    if logits == "all":
        final = torch.cat([base_final[:, :start], x], dim=1)
    elif logits == "last":
        rows = torch.arange(x.shape[0], device=x.device)
        new = x[rows, (last - start).clamp(min=0)]
        final = torch.where((last >= start)[:, None], new, base_final[rows, last])[:, None]
    else:
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    return model.unembed(model.ln_final(final))


def set_positions(source: Tensor, mask: Tensor, start: int, head: Optional[int] = None,
                  pattern: bool = False) -> PatchFn:
    """A patch writing ``source`` (full length, batch first) where ``mask [batch, pos]`` is True.

    With ``head``, only that head of a ``[batch, pos, head, d_head]`` activation. ``pattern``:
    ``source`` is ``[batch, head, query, key]`` and ``mask`` selects query rows.
    """
    m = mask[:, start:]
    if pattern:
        src = source[:, :, start:].transpose(1, 2)
        return lambda x: replace_at(x.transpose(1, 2), src, m, head).transpose(1, 2)
    src = source[:, start:]
    return lambda x: replace_at(x, src, m, head)


def replace_at(x: Tensor, src: Tensor, mask: Tensor, head: Optional[int] = None) -> Tensor:
    """A copy of ``x`` holding ``src`` where ``mask [batch, pos]`` is True (only ``head``, if given)."""
    x = x.clone()
    if head is None:
        x[mask] = src[mask].to(x.dtype)
    else:
        x[:, :, head][mask] = src[:, :, head][mask].to(x.dtype)
    return x
