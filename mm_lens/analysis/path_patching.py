"""Path patching: the effect of senders on receivers through chosen paths.

Components are named as strings: ``"L2H3"`` (head 3 of layer 2), ``"attn2"`` (every head of
layer 2), ``"mlp2"``. Receivers: ``"L3H1.q"`` / ``".k"`` / ``".v"`` (a head's query/key/value
input; ``k``/``v`` act on the key-value head the query head reads under grouped-query
attention), ``"resid_pre3"`` (the residual stream entering layer 3), ``"logits"``.

``freeze="heads"`` (default) is the definition of Wang et al. (2022, "Interpretability in the Wild",
the IOI circuit) as ARENA teaches it. For each sender: (1) run the base input with the sender's
output (its head's ``hook_z``, or ``hook_mlp_out``) taken from the source run at the sender
positions and every other attention head's output frozen at its base-run value, while MLPs and
norms recompute; record the receivers' inputs at the receiver positions. (2) Run the base input
again with only those receiver inputs patched in and read the metric. With ``"logits"`` as
receiver, step (1) gives the logits directly.

``freeze="heads+mlps"`` freezes the MLP outputs too, so only the direct path counts: the sender's
change reaches the receivers through the residual stream alone, the edge between two nodes of
the computational graph whose nodes are heads and MLPs (as edges are patched in ACDC, Conmy et
al., 2023).

``direction="denoise"`` patches clean senders into the corrupted run, as
:func:`~mm_lens.analysis.patching.activation_patch` does. On the fast engine
(:mod:`mm_lens.analysis.fast_patch`), step (1) resumes at the sender's layer from the first sender
position and stops after the last receiver layer; step (2) resumes at the first receiver layer
from the first receiver position; several senders of one layer share a forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis import fast_patch
from mm_lens.analysis.fast_patch import repeat_batch, replace_at, tail
from mm_lens.analysis.groups import GroupLike, resolve_batch
from mm_lens.analysis.patching import _evaluate, _logit_view, base_and_source
from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput

_SENDER = re.compile(r"^(?:L(\d+)H(\d+)|attn(\d+)|mlp(\d+))$")
_RECEIVER = re.compile(r"^(?:L(\d+)H(\d+)\.([qkv])|resid_pre(\d+)|logits)$")
FREEZE = ("heads", "heads+mlps")


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


def _first(mask: Tensor) -> int:
    return int(mask.any(0).nonzero()[0])


def _layer(name: str) -> int:
    return int(name.split(".")[1])


@dataclass
class _Runs:
    """The two unpatched runs and where the paths start and end."""

    base: MultimodalInput
    base_acts: dict  # base-run z (and mlp_out) of every layer, receivers' inputs
    source_acts: dict  # source-run outputs of the senders
    send_mask: Tensor  # [batch, pos]
    recv_mask: Tensor  # [batch, pos]
    receivers: list  # (hook name or "logits", head)
    freeze: str
    logits: str


def _sender_hook(base_value: Optional[Tensor], source_value: Optional[Tensor], mask: Tensor, copies: list, k: int):
    """The activation itself (``base_value`` None: it recomputes) or its frozen base value, with the rows of
    each sender copy j in ``copies`` taking the source value at the sender positions (``mask``)."""
    batch = mask.shape[0]

    def hook(x: Tensor, hook) -> Tensor:
        if base_value is None:
            out = x.clone()
        else:
            out = repeat_batch(tail(base_value, x.shape[1]), k).to(x.dtype, copy=True)
        for j, head in copies:
            out[j * batch:(j + 1) * batch] = replace_at(out[j * batch:(j + 1) * batch], source_value, mask, head)
        return out

    return hook


def _step_one_hooks(model, runs: _Runs, chunk: list, first_layer: int, start: int) -> list:
    """Step (1): every head's output frozen (and every MLP's with ``heads+mlps``), the senders of
    ``chunk`` (copy j = sender j) from the source run; activations from position ``start`` on."""
    hooks = []
    send = runs.send_mask[:, start:]
    for l in range(first_layer, model.cfg.n_layers):
        for site, name in (("z", f"blocks.{l}.attn.hook_z"), ("mlp", f"blocks.{l}.hook_mlp_out")):
            copies = [(j, head) for j, (kind, layer, head) in enumerate(chunk) if kind == site and layer == l]
            frozen = site == "z" or runs.freeze == "heads+mlps"
            if frozen or copies:
                base_value = runs.base_acts[name][:, start:] if frozen else None
                source_value = runs.source_acts[name][:, start:] if copies else None
                hooks.append((name, _sender_hook(base_value, source_value, send, copies, len(chunk))))
    return hooks


def _chunk_logits(model, runs: _Runs, chunk: list, run: Optional[fast_patch.BaseRun]) -> Tensor:
    """Both steps for the senders of ``chunk`` (one layer), on the engine when ``run`` is given:
    the logits view of ``len(chunk)`` copies of the base batch."""
    k, layer = len(chunk), chunk[0][1]
    start = run.resume_at(_first(runs.send_mask)) if run is not None else 0
    hooks = _step_one_hooks(model, runs, chunk, layer if run is not None else 0, start)
    names = sorted({n for n, _ in runs.receivers if n != "logits"})
    if not names:  # the receiver is the logits: step (1) is all there is
        if run is not None:
            return fast_patch.run_patched(model, run, layer, start, hooks, runs.logits, repeat=k)
        return _logit_view(model.run_with_hooks(runs.base, fwd_hooks=hooks), runs.base, runs.logits)
    recorded: dict = {}

    def record(x: Tensor, hook) -> None:
        recorded[hook.name] = x

    hooks += [(n, record) for n in names]
    stop = max(_layer(n) for n in names) + 1
    if run is not None:
        fast_patch.run_patched(model, run, layer, start, hooks, repeat=k, stop=stop)
    else:
        model.run_with_hooks(runs.base, fwd_hooks=hooks, stop_at_layer=stop)
    for n in names:  # receivers before the sender's layer (not run again) keep their base input
        recorded.setdefault(n, repeat_batch(runs.base_acts[n][:, start:], k))
    mask = repeat_batch(runs.recv_mask[:, start:], k)
    patches = [(n, fast_patch.set_positions(recorded[n], mask, head)) for n, head in runs.receivers]
    if run is not None:
        first = min(_layer(n) for n in names)
        resume = run.resume_at(max(start, _first(runs.recv_mask)))
        return fast_patch.run_patched(model, run, first, resume, patches, runs.logits, repeat=k)
    return _logit_view(model.run_with_hooks(runs.base, fwd_hooks=patches), runs.base, runs.logits)


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
    freeze: str = "heads",
    direction: str = "denoise",
    clean_hooks=None,
    corrupted_hooks=None,
    logits: str = "last",
    fast: Optional[bool] = None,
    batch_patches: int = 8,
    progress: bool = True,
) -> PatchResult:
    """The metric when each sender reaches the receivers (patched jointly) along the paths ``freeze`` leaves open.

    ``senders``: component names or ``"heads"`` (every head) / ``"all"`` (heads and MLPs);
    ``sender_positions``/``receiver_positions``: groups (default every position), e.g. senders at
    ``"image"`` and receivers at ``"last"``. ``freeze``: ``"heads"`` (Wang et al.'s IOI path patching:
    other heads frozen, MLPs recompute) or ``"heads+mlps"`` (direct path only). Hooks already on the
    model act in every run. ``fast=None`` runs a sender on the fast engine when the hooks on the model
    allow an exact resumed run (``batch_patches`` senders per forward), ``True`` requires it, ``False``
    runs full forwards. Returns a result over ``("sender",)``.
    """
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE} ('heads': Wang et al.'s IOI path patching; "
                         f"'heads+mlps': the direct path only), got {freeze!r}")
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
    outputs = {"z": "attn.hook_z", "mlp": "hook_mlp_out"}
    source_names = {f"blocks.{layer}.{outputs[kind]}" for kind, layer, _ in parsed}
    with model.hooks(fwd_hooks=source_hooks):
        source_logits, source_acts = model.run_with_cache(source, names_filter=lambda n: n in source_names,
                                                          return_cache_object=False)
    batch = base.shape[0]
    source_metric = _evaluate(metric, _logit_view(source_logits, source, logits), batch)
    frozen = ("attn.hook_z", "hook_mlp_out") if freeze == "heads+mlps" else ("attn.hook_z",)
    keep = [f"blocks.{l}.{s}" for l in range(cfg.n_layers) for s in frozen] + [n for n, _ in recv if n != "logits"]
    first_receiver = min([_layer(n) for n, _ in recv if n != "logits"] or [cfg.n_layers - 1])
    with model.hooks(fwd_hooks=base_hooks):  # from here on, the base run's hooks are hooks on the model
        resume = [min(layer, first_receiver) for _, layer, _ in parsed]
        on_engine = fast_patch.engine_layers(model, fast, resume, True, "path patching")
        if on_engine:
            run, base_logits = fast_patch.capture(model, base, extra=keep)
            base_acts = run.extra
        else:
            run = None
            base_logits, base_acts = model.run_with_cache(base, names_filter=lambda n: n in keep,
                                                          return_cache_object=False)
        runs = _Runs(base, base_acts, source_acts, _position_mask(model, base, sender_positions),
                     _position_mask(model, base, receiver_positions), recv, freeze, logits)
        baseline = _evaluate(metric, _logit_view(base_logits, base, logits), batch)
        values: list = [None] * len(parsed)
        bar = tqdm(total=len(parsed), desc="path patch", disable=not progress)
        try:
            for chunk in _chunks(parsed, resume, on_engine, max(1, batch_patches)):
                out = _chunk_logits(model, runs, [parsed[i] for i in chunk], run if resume[chunk[0]] in on_engine
                                    else None)
                for i, o in zip(chunk, out.split(batch)):
                    values[i] = _evaluate(metric, o, batch)
                bar.update(len(chunk))
        finally:
            bar.close()
    per_example = torch.stack(values)
    meta = {"receivers": receivers, "direction": direction, "freeze": freeze,
            "fast": bool(on_engine) and on_engine >= set(resume)}
    return PatchResult(per_example.mean(-1), ("sender",), {"sender": senders}, per_example if batch > 1 else None,
                       baseline, meta, source_metric)


def _chunks(parsed: list, resume: list, on_engine: set, size: int) -> list[list[int]]:
    """Sender indices grouped by layer, at most ``size`` per chunk on the engine (one per full forward)."""
    groups: dict = {}
    for i, (_, layer, _) in enumerate(parsed):
        groups.setdefault(layer, []).append(i)
    chunks = []
    for group in groups.values():
        step = size if resume[group[0]] in on_engine else 1
        chunks += [group[i:i + step] for i in range(0, len(group), step)]
    return chunks
