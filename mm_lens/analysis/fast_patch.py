"""The fast patching engine: resume a run at layer L on the suffix of positions a patch can change.

A patch at layer L and positions ``>= start`` leaves every layer below L, every position below
``start`` (causal attention; with bidirectional image groups, ``start`` is first moved back to the start of
its group: :meth:`BaseRun.resume_at`) and the vision tower unchanged. So a patched run starts from the input
the base run's block L received, at positions ``start..n-1`` only, and runs the model's own blocks
(:meth:`~mm_lens.HookedVLM.run_blocks`, every hook on them firing) over the base run's keys and
values of the earlier positions (a frozen :class:`~mm_lens.components.KVCache` prefix), with the vision
features the base run's DeepStack blocks added (Qwen3-VL's ``hook_visual_in``, as they received them); it
unembeds only the positions the metric reads.

:func:`capture` records a base run; :func:`run_patched` runs patches, given as ordinary
``(hook_name, fn)`` forward hooks. They see suffix tensors: positions ``start..n-1`` (the last block
may run only the last position past attention, so hooks there see just the trailing positions) of a
batch repeated once per patch. :func:`set_positions` makes such a patch. Hooks already on the model
are honoured where :func:`mm_lens.hooks.inexact_hooks` finds none that a suffix run would get wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.components import AttentionMask, KVCache
from mm_lens.hooks import inexact_hooks
from mm_lens.inputs import MultimodalInput

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "mlp_post", "z", "q", "k", "v", "pattern")
Hook = tuple[str, Callable]


@dataclass
class BaseRun:
    """What a patched run reuses from its base run (the run being patched into)."""

    inputs: MultimodalInput
    block_inputs: list[Tensor]  # per layer: what block l received, [batch, pos, d_model]
    final: Tensor  # what ln_final received, [batch, pos, d_model]
    cache: KVCache  # keys and values of every position and layer, attention mask, position ids
    mask: AttentionMask
    last: Tensor  # [batch]: last prompt position of each row
    visual: Optional[list[Tensor]] = None  # per DeepStack layer: what hook_visual_in received, [batch, pos, d_model]
    extra: dict = field(default_factory=dict, repr=False)  # further activations asked for in capture()
    _masks: dict = field(default_factory=dict, repr=False)

    def resume_at(self, position: int) -> int:
        """Where a run patched from ``position`` on must resume: ``position``, or the start of its image group
        when earlier positions of that group attend to it (Gemma 3's bidirectional image attention)."""
        return self.mask.first_reader(position)

    def repeated_mask(self, k: int) -> AttentionMask:
        if k not in self._masks:
            self._masks[k] = self.mask.repeat(k)
        return self._masks[k]


@torch.no_grad()
def capture(model, inputs: MultimodalInput, extra: Sequence[str] = ()) -> tuple[BaseRun, Tensor]:
    """Run ``inputs`` once, with every hook on the model, and keep what patched runs reuse.

    Returns ``(base, logits)``; ``extra``: hook names whose activations to keep (``base.extra``).
    """
    L = model.cfg.n_layers
    received: dict = {}

    def keep(key):
        def hook(module, args):
            received[key] = args[0]
        return hook

    # prepended: what each block is given, before any pre-hook of the user's runs on it (it runs again there)
    handles = [block.register_forward_pre_hook(keep(l), prepend=True) for l, block in enumerate(model.blocks)]
    handles.append(model.ln_final.register_forward_pre_hook(keep("final"), prepend=True))
    deepstack = range(getattr(model, "n_deepstack", 0))  # Qwen3-VL: the vision features each block adds
    handles += [model.blocks[l].hook_visual_in.register_forward_pre_hook(keep(("visual", l)), prepend=True)
                for l in deepstack]
    cache = KVCache.empty(L)
    wanted = set(extra)
    try:
        logits, acts = model.run_with_cache(inputs, names_filter=lambda n: n in wanted, return_cache_object=False,
                                            past_kv_cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    base = BaseRun(inputs=inputs, block_inputs=[received[l] for l in range(L)], final=received["final"],
                   cache=cache.freeze(), mask=model.attention_mask(inputs),
                   last=inputs.positions.last_positions.to(logits.device), extra={n: acts[n] for n in extra},
                   visual=[received[("visual", l)] for l in deepstack] or None)
    return base, logits


def engine_layers(model, fast: Optional[bool], layers: Sequence[int], supported: bool, what: str) -> set[int]:
    """The layers whose patches run on the engine: those it can resume at exactly given the hooks now on the
    model (``fast=None``), none (``False``), or all of them (``True``: a ValueError naming what is in the way)."""
    if fast is False:
        return set()
    if not supported:
        if fast:
            raise ValueError(f"the fast engine cannot run {what}; pass fast=None or fast=False")
        return set()
    blocking = {l: inexact_hooks(model, l) for l in sorted(set(layers))}
    if fast and any(blocking.values()):
        first = min(l for l, found in blocking.items() if found)
        raise ValueError(
            f"fast=True, but hooks on the model would see only part of the positions on the fast engine "
            f"(resuming at layer {first}): {blocking[first]}. Pass fast=None (full forwards), remove them, or mark "
            "a hook that treats every position and batch row alike with mm_lens.positionwise(fn)")
    return {l for l, found in blocking.items() if not found}


def repeat_batch(t: Tensor, k: int) -> Tensor:
    """``t`` repeated ``k`` times along the batch (its first axis)."""
    return t if k == 1 else t.repeat(k, *([1] * (t.ndim - 1)))


@torch.no_grad()
def run_patched(model, base: BaseRun, layer: int, start: int, hooks: Sequence[Hook] = (), logits: str = "last",
                repeat: int = 1, stop: Optional[int] = None) -> Float[Tensor, "batch pos d_vocab"]:
    """Resume the base run at block ``layer`` for positions ``start..n-1`` with forward ``hooks`` added.

    ``repeat=k`` runs k copies of the base batch at once (several patches per forward): hooks then see
    ``k * batch`` rows, copy j in rows ``j*batch..(j+1)*batch-1``. ``logits="last"``: the logits at each
    row's last prompt position, ``[batch, 1, d_vocab]``; ``"all"``: every position (those before
    ``start`` from the base run). ``stop``: return the residual before block ``stop`` (suffix positions).
    """
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    if base.resume_at(start) != start:
        raise ValueError(f"positions before {start} attend to position {start} (one image group): resume at "
                         f"base.resume_at({start}) = {base.resume_at(start)}")
    n = base.final.shape[1]
    x = repeat_batch(base.block_inputs[layer][:, start:], repeat)
    positions = base.cache.position_ids[..., start:]
    positions = positions.repeat(*([1] * (positions.ndim - 2)), repeat, 1)
    visual = None if base.visual is None else [repeat_batch(v[:, start:], repeat) for v in base.visual]
    # the last block runs only the last row past attention when that is all the logits read
    last_only = stop is None and logits == "last" and bool((base.last == n - 1).all())
    with model.hooks(fwd_hooks=list(hooks)):
        x = model.run_blocks(x, base.repeated_mask(repeat), positions, base.cache.prefix(start), layer, stop,
                             n_out=1 if last_only else None, visual=visual)
    if stop is not None or last_only:
        return x if stop is not None else model.unembed(model.ln_final(x))
    final, last = repeat_batch(base.final, repeat), repeat_batch(base.last, repeat)
    if logits == "all":
        return model.unembed(model.ln_final(torch.cat([final[:, :start], x], dim=1)))
    rows = torch.arange(x.shape[0], device=x.device)
    new = x[rows, (last - start).clamp(min=0)]
    chosen = torch.where((last >= start)[:, None], new, final[rows, last])[:, None]
    return model.unembed(model.ln_final(chosen))


def tail(t: Tensor, n: int, dim: int = 1) -> Tensor:
    """The last ``n`` entries of ``t`` along ``dim`` (engine hooks see trailing positions)."""
    return t if t.shape[dim] == n else t.narrow(dim, t.shape[dim] - n, n)


def replace_at(x: Tensor, src: Tensor, mask: Tensor, head: Optional[int] = None) -> Tensor:
    """A copy of ``x`` holding ``src`` where ``mask [batch, pos]`` is True (only ``head``, if given).

    ``src`` and ``mask`` may cover more positions than ``x``: their trailing ones line up with ``x``'s.
    """
    src, mask = tail(src, x.shape[1]), tail(mask, x.shape[1])
    x = x.clone()
    if head is None:
        x[mask] = src[mask].to(x.dtype)
    else:
        x[:, :, head][mask] = src[:, :, head][mask].to(x.dtype)
    return x


def set_positions(source: Tensor, mask: Tensor, head: Optional[int] = None, pattern: bool = False) -> Callable:
    """A hook writing ``source`` where ``mask [batch, pos]`` is True (trailing positions line up).

    With ``head``, only that head of a ``[batch, pos, head, d_head]`` activation. ``pattern``: ``source``
    is ``[batch, head, query, key]`` and ``mask`` selects query rows.
    """
    if pattern:
        src = source.transpose(1, 2)
        return lambda x, hook: replace_at(x.transpose(1, 2), src, mask, head).transpose(1, 2)
    return lambda x, hook: replace_at(x, source, mask, head)
