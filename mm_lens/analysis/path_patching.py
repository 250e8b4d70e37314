"""Path patching (Wang et al., IOI): the effect of senders on receivers through direct paths only.

Components are named as strings: ``"L2H3"`` (head 3 of layer 2), ``"attn2"`` (every head of
layer 2), ``"mlp2"``. Receivers: ``"L3H1.q"`` / ``".k"`` / ``".v"`` (a head's query/key/value
input; ``k``/``v`` act on the key-value head the query head reads under grouped-query
attention), ``"resid_pre3"`` (the residual stream entering layer 3), ``"logits"``.

For each sender: (1) run the base input with every head output (``z``) and MLP output frozen at
the base run's values, except the sender at the sender positions, which takes the source
run's value; record the receivers' inputs at the receiver positions. (2) Run the base input
again with only those receiver inputs patched in and read the metric. With ``"logits"`` as
receiver, step (1) gives the logits directly. ``direction="denoise"`` patches clean senders into
the corrupted run, as :func:`~mm_lens.analysis.patching.activation_patch` does.

With every other output frozen, step (1) changes the residual stream after the sender by exactly
the sender's own change of output at the sender positions, so the fast path computes the
receivers' inputs from the base run's residual plus that difference (no forward at all for
``"logits"``) and runs step (2) on the fast engine (:mod:`mm_lens.analysis.fast_patch`), several
senders per forward. It applies when the base run's own hooks act at ``hook_embed`` or earlier;
otherwise both steps run as full hooked forwards.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis import fast_patch
from mm_lens.analysis.fast_patch import replace_at
from mm_lens.analysis.groups import GroupLike, resolve_batch
from mm_lens.analysis.patching import _evaluate, _logit_view, base_and_source, choose_fast
from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput

_SENDER = re.compile(r"^(?:L(\d+)H(\d+)|attn(\d+)|mlp(\d+))$")
_RECEIVER = re.compile(r"^(?:L(\d+)H(\d+)\.([qkv])|resid_pre(\d+)|logits)$")


def parse_sender(name: str, n_layers: int, n_heads: int) -> tuple[str, int, Optional[int]]:
    """``"L2H3"`` -> ``("z", 2, 3)``, ``"attn2"`` -> ``("z", 2, None)``, ``"mlp2"`` -> ``("mlp", 2, None)``."""
    m = _SENDER.match(name)
    if not m:
        raise ValueError(f"sender {name!r} is not a component; write 'L<layer>H<head>', 'attn<layer>' or 'mlp<layer>'")
    if m.group(1) is not None:
        kind, layer, head = "z", int(m.group(1)), int(m.group(2))
    elif m.group(3) is not None:
        kind, layer, head = "z", int(m.group(3)), None
    else:
        kind, layer, head = "mlp", int(m.group(4)), None
    if not 0 <= layer < n_layers or (head is not None and not 0 <= head < n_heads):
        raise ValueError(f"sender {name!r} is outside the model ({n_layers} layers, {n_heads} heads)")
    return kind, layer, head


def parse_receiver(name: str, model) -> tuple[str, Optional[int]]:
    """Receiver -> ``(hook name or 'logits', head index in that hook or None)``."""
    m = _RECEIVER.match(name)
    if not m:
        raise ValueError(f"receiver {name!r} is not understood; write 'L<layer>H<head>.q|k|v', "
                         "'resid_pre<layer>' or 'logits'")
    cfg = model.cfg
    if name == "logits":
        return "logits", None
    if m.group(4) is not None:
        layer = int(m.group(4))
        if not 0 <= layer < cfg.n_layers:
            raise ValueError(f"receiver {name!r}: layer outside 0..{cfg.n_layers - 1}")
        return f"blocks.{layer}.hook_resid_pre", None
    layer, head, which = int(m.group(1)), int(m.group(2)), m.group(3)
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise ValueError(f"receiver {name!r} is outside the model")
    if which != "q":
        head = head // (cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads))
    return f"blocks.{layer}.attn.hook_{which}", head


def _position_mask(model, inputs: MultimodalInput, group: Optional[GroupLike]) -> Tensor:
    if group is None:
        return torch.ones(inputs.shape, dtype=torch.bool, device=inputs.device)
    mask = torch.zeros(inputs.shape, dtype=torch.bool, device=inputs.device)
    for r, pos in enumerate(resolve_batch(model, inputs, group)):
        mask[r, pos.to(mask.device)] = True
    return mask


def _freeze_hooks(model, base_cache: dict, source_cache: dict, sender, mask: Tensor) -> list:
    """Every head output and MLP output at its base value, the sender at its source value."""
    kind, layer, head = sender
    hooks = []
    for l in range(model.cfg.n_layers):
        for k, name in (("z", f"blocks.{l}.attn.hook_z"), ("mlp", f"blocks.{l}.hook_mlp_out")):
            def fn(x, hook, name=name, is_sender=(k == kind and l == layer)):
                out = base_cache[name].to(x.dtype).clone()
                return replace_at(out, source_cache[name], mask, head) if is_sender else out
            hooks.append((name, fn))
    return hooks


def _sender_delta(model, base_acts: dict, source_acts: dict, sender, mask: Tensor) -> Tensor:
    """What the sender writes to the residual stream in the source run minus the base run, at the
    sender positions: ``[batch, pos, d_model]``."""
    kind, layer, head = sender
    if kind == "mlp":
        name = f"blocks.{layer}.hook_mlp_out"
        delta = source_acts[name] - base_acts[name]
    else:
        name = f"blocks.{layer}.attn.hook_z"
        dz = source_acts[name] - base_acts[name]  # [batch, pos, head, d_head]
        W_O = model.blocks[layer].attn.W_O
        delta = dz[:, :, head] @ W_O[head] if head is not None else torch.einsum("bphe,hed->bpd", dz, W_O)
    return delta * mask[..., None].to(delta.dtype)


def _receiver_input(model, run: fast_patch.BaseRun, layer: int, site: str, delta: Optional[Tensor]) -> Tensor:
    """The receiver's input when the residual entering ``layer`` is the base run's plus ``delta``."""
    resid = run.resid_pre[layer] if delta is None else run.resid_pre[layer] + delta
    if site == "resid_pre":
        return resid
    attn = model.blocks[layer].attn
    W, b = {"q": (attn.W_Q, attn.b_Q), "k": (attn._W_K, attn._b_K), "v": (attn._W_V, attn._b_V)}[site]
    return attn._project(model.blocks[layer].ln1(resid), W, b)


def _chain(first: Optional[fast_patch.PatchFn], then: fast_patch.PatchFn) -> fast_patch.PatchFn:
    return then if first is None else (lambda x: then(first(x)))


def _fast_values(model, run: fast_patch.BaseRun, source_acts: dict, parsed: list, recv: list, send_mask: Tensor,
                 recv_mask: Tensor, metric, logits: str, batch_patches: int, bar) -> list[Tensor]:
    batch = run.final.shape[0]
    values = []
    targets = []  # (layer, site, head) of each receiver
    for name, head in recv:
        if name != "logits":
            parts = name.split(".")
            targets.append((int(parts[1]), parts[-1][len("hook_"):], head))
    start = int(recv_mask.any(0).nonzero()[0]) if targets else 0
    for i in range(0, len(parsed), batch_patches):
        chunk = parsed[i:i + batch_patches]
        deltas = [_sender_delta(model, run.extra, source_acts, sender, send_mask) for sender in chunk]
        if not targets:  # logits: the residual after the last layer, plus the sender's change
            outs = []
            for delta in deltas:
                final = run.final + delta
                if logits == "last":
                    rows = torch.arange(batch, device=final.device)
                    final = final[rows, run.last][:, None]
                outs.append(model.unembed(model.ln_final(final)))
        else:
            k = len(chunk)
            patches: dict = {}
            for layer, site, head in targets:
                inputs = torch.cat([_receiver_input(model, run, layer, site, delta if layer > sender[1] else None)
                                    for sender, delta in zip(chunk, deltas)])
                patch = fast_patch.set_positions(inputs, recv_mask.repeat(k, 1), start, head)
                patches[(layer, site)] = _chain(patches.get((layer, site)), patch)
            first = min(layer for layer, _, _ in targets)
            outs = fast_patch.run_patched(model, run, first, start, patches, logits=logits, repeat=k).split(batch)
        values.extend(_evaluate(metric, out, batch) for out in outs)
        bar.update(len(chunk))
    return values


@torch.no_grad()
def path_patch(
    model,
    clean: MultimodalInput,
    corrupted: MultimodalInput,
    metric: Callable[[Tensor], Tensor],
    senders: Union[str, Sequence[str]] = "heads",
    receivers: Union[str, Sequence[str]] = "logits",
    sender_positions: Optional[GroupLike] = None,
    receiver_positions: Optional[GroupLike] = None,
    direction: str = "denoise",
    clean_hooks=None,
    corrupted_hooks=None,
    logits: str = "last",
    fast: Optional[bool] = None,
    batch_patches: int = 8,
    progress: bool = True,
) -> PatchResult:
    """The metric when each sender reaches the receivers (patched jointly) through direct paths only.

    ``senders``: component names or ``"heads"`` (every head) / ``"all"`` (heads and MLPs);
    ``sender_positions``/``receiver_positions``: groups (default every position), e.g. senders at
    ``"image"`` and receivers at ``"last"``. ``fast=None`` takes the fast path whenever it applies
    (``batch_patches`` senders per forward). Returns a result over ``("sender",)``.
    """
    cfg = model.cfg
    if senders == "heads":
        senders = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    elif senders == "all":
        senders = [c for l in range(cfg.n_layers) for c in [f"L{l}H{h}" for h in range(cfg.n_heads)] + [f"mlp{l}"]]
    senders = [senders] if isinstance(senders, str) else list(senders)
    receivers = [receivers] if isinstance(receivers, str) else list(receivers)
    parsed = [parse_sender(s, cfg.n_layers, cfg.n_heads) for s in senders]
    recv = [parse_receiver(r, model) for r in receivers]
    if ("logits", None) in recv and len(recv) > 1:
        raise ValueError("'logits' is a receiver on its own; path-patch it separately")
    base, base_hooks, source, source_hooks = base_and_source(clean, corrupted, direction, clean_hooks, corrupted_hooks)
    use_fast = choose_fast(fast, base_hooks, True, "path patching")
    names = [f"blocks.{l}.{s}" for l in range(cfg.n_layers) for s in ("attn.hook_z", "hook_mlp_out")]
    with model.hooks(fwd_hooks=source_hooks):
        source_logits, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names,
                                                           return_cache_object=False)
    if use_fast:
        run, base_logits = fast_patch.capture(model, base, base_hooks, extra=names)
        base_cache = run.extra
    else:
        with model.hooks(fwd_hooks=base_hooks):
            base_logits, base_cache = model.run_with_cache(base, names_filter=lambda n: n in names,
                                                           return_cache_object=False)
    batch = base.shape[0]
    baseline = _evaluate(metric, _logit_view(base_logits, base, logits), batch)
    source_metric = _evaluate(metric, _logit_view(source_logits, source, logits), batch)
    send_mask = _position_mask(model, base, sender_positions)
    recv_mask = _position_mask(model, base, receiver_positions)
    bar = tqdm(total=len(parsed), desc="path patch", disable=not progress)
    try:
        if use_fast:
            values = _fast_values(model, run, source_cache, parsed, recv, send_mask, recv_mask, metric, logits,
                                  max(1, batch_patches), bar)
        else:
            values = _slow_values(model, base, base_hooks, base_cache, source_cache, parsed, recv, send_mask,
                                  recv_mask, metric, logits, bar)
    finally:
        bar.close()
    per_example = torch.stack(values)
    return PatchResult(per_example.mean(-1), ("sender",), {"sender": senders},
                       per_example if batch > 1 else None, baseline,
                       {"receivers": receivers, "direction": direction, "fast": use_fast}, source_metric)


def _slow_values(model, base: MultimodalInput, base_hooks: list, base_cache: dict, source_cache: dict, parsed: list,
                 recv: list, send_mask: Tensor, recv_mask: Tensor, metric, logits: str, bar) -> list[Tensor]:
    """Both steps as full hooked forwards (base-run hooks past the embedding)."""
    batch = base.shape[0]
    recv_names = [n for n, _ in recv if n != "logits"]
    values = []
    for sender in parsed:
        frozen = _freeze_hooks(model, base_cache, source_cache, sender, send_mask)
        with model.hooks(fwd_hooks=base_hooks + frozen):
            out, captured = model.run_with_cache(base, names_filter=lambda n: n in recv_names, return_cache_object=False)
        if recv_names:
            patch_hooks = [(n, lambda x, hook, n=n, h=h, captured=captured: replace_at(x, captured[n], recv_mask, h))
                           for n, h in recv]
            out = model.run_with_hooks(base, fwd_hooks=base_hooks + patch_hooks)
        values.append(_evaluate(metric, _logit_view(out, base, logits), batch))
        bar.update(1)
    return values
