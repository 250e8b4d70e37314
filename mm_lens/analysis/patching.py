"""Activation patching across image and text positions.

``activation_patch`` patches clean activations into the corrupted run (``direction="denoise"``)
or corrupted into clean (``"noise"``), one cell at a time: per layer x position (``"each"``)
or per layer x position group, and per head for head-level hooks, as TransformerLens'
``patching`` functions do. Every language-model site runs on the fast engine
(:mod:`mm_lens.analysis.fast_patch`) at the layers where the hooks on the model (including the
base run's ``clean_hooks``/``corrupted_hooks``) allow an exact resumed run; vision hooks
(``vision_<site>``) and other layers run full forwards with a hook. ``hook="sae_acts"`` patches the
features of an SAE spliced in (:mod:`mm_lens.sae`) one at a time.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from mm_lens.analysis import fast_patch
from mm_lens.analysis.groups import GroupLike, as_group, resolve_batch
from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput
from mm_lens.memory import hook_shapes

LM_HOOKS = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_post": "mlp.hook_post",
    "z": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
}
HEAD_HOOKS = ("z", "q", "k", "v", "pattern")
Metric = Callable[[Tensor], Tensor]
Positions = Union[str, GroupLike, Sequence[GroupLike]]


def hook_name(model, hook: str, layer: int) -> str:
    """``"resid_pre"`` -> ``blocks.{layer}.hook_resid_pre``; ``"vision_resid_pre"`` -> the vision tower's."""
    if hook.startswith("vision_"):
        site = hook[len("vision_"):]
        if site not in LM_HOOKS:
            raise ValueError(f"unknown vision hook {hook!r}; use vision_ + one of {list(LM_HOOKS)}")
        return f"vision_encoder.blocks.{layer}.{LM_HOOKS[site]}"
    if hook not in LM_HOOKS:
        raise ValueError(f"unknown hook {hook!r}; use one of {list(LM_HOOKS)} or vision_<site>")
    return f"blocks.{layer}.{LM_HOOKS[hook]}"


def _as_hooks(hooks) -> list:
    if hooks is None:
        return []
    if isinstance(hooks, tuple) and len(hooks) == 2 and isinstance(hooks[0], str):
        return [hooks]
    return list(hooks)


def base_and_source(clean: MultimodalInput, corrupted: MultimodalInput, direction: str, clean_hooks, corrupted_hooks
                    ) -> tuple[MultimodalInput, list, MultimodalInput, list]:
    """``(base, base_hooks, source, source_hooks)``: the run patched into and the run patched from."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' (clean into corrupted) or 'noise', got {direction!r}")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same shape")
    clean_hooks, corrupted_hooks = _as_hooks(clean_hooks), _as_hooks(corrupted_hooks)
    if direction == "denoise":
        return corrupted, corrupted_hooks, clean, clean_hooks
    return clean, clean_hooks, corrupted, corrupted_hooks


def _logit_view(logits: Tensor, inputs: MultimodalInput, which: str) -> Tensor:
    if which == "all":
        return logits
    if which != "last":
        raise ValueError(f"logits must be 'last' or 'all', got {which!r}")
    last = inputs.positions.last_positions.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), last][:, None]


def _evaluate(metric: Metric, logits: Tensor, batch: int) -> Tensor:
    out = torch.as_tensor(metric(logits)).detach().float()
    if out.ndim == 0:
        return out[None]
    if out.shape != (batch,):
        raise ValueError(f"the metric must return a scalar or a [batch={batch}] tensor, got shape {tuple(out.shape)}")
    return out


def _cells(model, inputs: MultimodalInput, hook: str, positions: Positions, layers, heads: bool):
    """``(axes, labels, [(index, layer, mask [batch, pos], head)])`` for the sweep."""
    vision = hook.startswith("vision_")
    n_layers = model.cfg.vision.n_layers if vision else model.cfg.n_layers
    if layers is None:  # the vision tower runs only the blocks before the layer the projector reads
        layers = list(range(max(l % (n_layers + 1) for l in model.cfg.feature_layers) if vision else n_layers))
    layers = list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{n_layers - 1}")
    site = hook[len("vision_"):] if vision else hook
    if heads and site not in HEAD_HOOKS:
        raise ValueError(f"heads=True needs a per-head hook ({HEAD_HOOKS}), not {hook!r}")
    n_heads = model.cfg.n_key_value_heads if site in ("k", "v") and model.cfg.n_key_value_heads else model.cfg.n_heads
    if vision:
        n_heads = model.cfg.vision.n_heads
    heads = heads or site == "pattern"
    masks, pos_labels, pos_axis = _position_masks(model, inputs, positions, vision)
    axes = ("layer", pos_axis) + (("head",) if heads else ())
    labels = {"layer": layers, pos_axis: pos_labels}
    cells = []
    for li, l in enumerate(layers):
        for pi, m in enumerate(masks):
            for h in (range(n_heads) if heads else [None]):
                cells.append(((li, pi) + ((h,) if h is not None else ()), l, m, h))
    return axes, labels, cells


def _position_masks(model, inputs: MultimodalInput, positions: Positions, vision: bool):
    """``(masks [batch, pos] per cell, labels, axis name)``: one position (``"each"``) or one group per cell."""
    # the vision tower sees every image (every crop of a LLaVA-NeXT image) as a row, of the length the forward makes
    batch, n_pos = hook_shapes(model, inputs)["vision_encoder.hook_embed"][:2] if vision else inputs.shape
    if vision and positions == "all":
        return [torch.ones(batch, n_pos, dtype=torch.bool, device=inputs.device)], ["all"], "group"
    if isinstance(positions, str) and positions == "each":
        masks = []
        for p in range(n_pos):
            m = torch.zeros(batch, n_pos, dtype=torch.bool, device=inputs.device)
            m[:, p] = True
            masks.append(m)
        return masks, list(range(n_pos)), "pos"
    if vision:
        raise ValueError("vision hooks take positions='each' (vision token index) or 'all'")
    groups = [positions] if isinstance(positions, (str, int)) or not isinstance(positions, (list, tuple)) \
        or (positions and isinstance(positions[0], int)) else list(positions)
    pos_labels, masks = [], []
    for g in groups:
        if isinstance(g, str) and g == "all":
            m = torch.ones(inputs.shape, dtype=torch.bool, device=inputs.device)
            name = "all"
        else:
            m = torch.zeros(inputs.shape, dtype=torch.bool, device=inputs.device)
            for r, pos in enumerate(resolve_batch(model, inputs, g)):
                m[r, pos.to(m.device)] = True
            name = as_group(g).name
        pos_labels.append(name)
        masks.append(m)
    return masks, pos_labels, "group"


def _feature_cells(model, base: MultimodalInput, source: MultimodalInput, name: str, positions: Positions, features,
                   base_hooks, source_hooks):
    """``(axes, labels, cells)`` over (SAE feature, position or group); cells carry the splice's block as layer and
    the feature as head. ``features=None``: the features whose activation differs between the two runs at the
    chosen positions (patching any other changes nothing)."""
    from mm_lens.sae.names import block_of

    where = block_of(name)
    vision = name.startswith("vision_encoder.")
    masks, pos_labels, pos_axis = _position_masks(model, base, positions, vision)
    if features is None:
        acts = []
        for inputs, hooks in ((base, base_hooks), (source, source_hooks)):
            with model.hooks(fwd_hooks=hooks):
                acts.append(model.run_with_cache(inputs, names_filter=[name], return_cache_object=False)[1][name])
        where_any = torch.stack(masks).any(0).to(acts[0].device)
        features = ((acts[0] - acts[1])[where_any] != 0).any(0).nonzero().flatten().tolist()
        if not features:
            raise ValueError(f"no feature of the SAE at {name} differs between the two runs at positions={positions!r}: "
                             "patching its features changes nothing")
    features = [int(f) for f in ([features] if isinstance(features, int) else features)]
    layer = where[1] if where is not None and where[0] == "blocks" else -1
    cells = [((fi, pi), layer, m, f) for fi, f in enumerate(features) for pi, m in enumerate(masks)]
    return ("feature", pos_axis), {"feature": features, pos_axis: pos_labels}, cells


@torch.no_grad()
def activation_patch(
    model,
    clean: MultimodalInput,
    corrupted: MultimodalInput,
    metric: Metric,
    hook: str = "resid_pre",
    positions: Positions = "each",
    layers: Optional[Sequence[int]] = None,
    heads: bool = False,
    direction: str = "denoise",
    clean_hooks=None,
    corrupted_hooks=None,
    logits: str = "last",
    fast: Optional[bool] = None,
    batch_patches: int = 8,
    progress: bool = True,
    sae=None,
    features: Optional[Sequence[int]] = None,
) -> PatchResult:
    """Patch one activation at a time and read ``metric`` on the patched logits.

    ``metric(logits) -> scalar or [batch]``; with ``logits="last"`` (default, fastest) it gets
    the logits of each row's last prompt position as ``[batch, 1, d_vocab]`` (so ``logits[:, -1]``
    reads as usual); ``logits="all"`` gives every position. ``positions``: ``"each"`` (axis
    ``pos``), a group or a list of groups (axis ``group``; ``"all"`` = every position).
    ``heads=True`` adds a ``head`` axis for ``z/q/k/v`` (``pattern`` is always per head; its
    positions are query positions). ``clean_hooks``/``corrupted_hooks``: forward hooks that make a
    run (e.g. :func:`~mm_lens.analysis.corruptions.embedding_noise_hook`); hooks already on the model
    (permanent ones, ``with model.hooks(...)``, module hooks, splices) act on both runs, as in full
    forwards. ``fast=None`` runs a layer's patches on the fast engine when that is exact: no hook on
    the model that a resumed suffix run would get wrong (see :func:`mm_lens.positionwise`); ``True``
    requires it (a ValueError names the hooks in the way), ``False`` runs full forwards. Returns a
    :class:`PatchResult` (``baseline``: the metric of the unpatched base run; ``meta["fast_layers"]``:
    the layers run on the engine). ``batch_patches``: patches per forward on the fast engine (same
    layer and head; 1 turns batching off).

    ``hook="sae_acts"``: the feature activations (``hook_sae_acts_post``) of an SAE spliced in with
    ``model.add_sae`` (``sae``: the SAE or its hook name; default the only one), one feature at a time at each
    position or group (axes ``("feature", "pos" | "group")``). ``features``: which (default: those whose
    activation differs between the two runs at those positions). A splice acts per position, so it runs
    on the fast engine at the SAE's block.
    """
    base, base_hooks, source, source_hooks = base_and_source(clean, corrupted, direction, clean_hooks, corrupted_hooks)
    if hook == "sae_acts":
        sae_name = sae_acts_name(model, sae)
        axes, labels, cells = _feature_cells(model, base, source, sae_name, positions, features, base_hooks,
                                             source_hooks)
        name_of, supported = (lambda l: sae_name), cells[0][1] >= 0
    else:
        axes, labels, cells = _cells(model, base, hook, positions, layers, heads)
        name_of, supported = (lambda l: hook_name(model, hook, l)), hook in fast_patch.SITES
    names = sorted({name_of(l) for _, l, _, _ in cells})
    with model.hooks(fwd_hooks=source_hooks):
        src_logits, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names,
                                                     return_cache_object=False)
    check_ran(model, names, src_cache)
    batch = base.shape[0]
    source_metric = _evaluate(metric, _logit_view(src_logits, source, logits), batch)
    with model.hooks(fwd_hooks=base_hooks):  # from here on, the base run's hooks are hooks on the model
        on_engine = fast_patch.engine_layers(model, fast, [l for _, l, _, _ in cells], supported,
                                             f"hook={hook!r} (it patches {fast_patch.SITES} and SAE features in blocks)")
        if on_engine:
            run, base_logits = fast_patch.capture(model, base)
        else:
            base_logits = model(base)
        baseline = _evaluate(metric, _logit_view(base_logits, base, logits), batch)
        store = torch.zeros(tuple(len(labels[a]) for a in axes[:2]) + ((cells[-1][0][-1] + 1,) if len(axes) == 3 else ())
                            + (batch,))
        pattern = hook.endswith("pattern")  # [batch, head, query, key]: positions are query rows
        bar = tqdm(total=len(cells), desc=f"patch {hook}", disable=not progress)
        try:
            for chunk in _chunks(cells, batch_patches, on_engine):
                _, layer, _, head = chunk[0]
                name = name_of(layer)
                src, k = src_cache[name], len(chunk)
                mask = torch.cat([c[2] for c in chunk])
                if layer in on_engine:
                    start = run.resume_at(int(mask.any(0).nonzero()[0]))
                    src = (src[:, :, start:] if pattern else src[:, start:]).repeat(k, *([1] * (src.ndim - 1)))
                    patch = fast_patch.set_positions(src, mask[:, start:], head, pattern)
                    out = fast_patch.run_patched(model, run, layer, start, [(name, patch)], logits, repeat=k)
                else:
                    patch = fast_patch.set_positions(src, mask, head, pattern)
                    out = _logit_view(model.run_with_hooks(base, fwd_hooks=[(name, patch)]), base, logits)
                for (index, _, _, _), o in zip(chunk, out.split(batch)):
                    store[index] = _evaluate(metric, o, batch)
                bar.update(k)
        finally:
            bar.close()
    per_example = store if batch > 1 else None
    run_layers = {l for _, l, _, _ in cells}
    meta = {"hook": hook, "direction": direction, "fast": bool(on_engine) and on_engine >= run_layers,
            "fast_layers": sorted(on_engine)}
    if hook == "sae_acts":
        meta["sae"] = names[0]
    return PatchResult(store.mean(-1), axes, labels, per_example, baseline, meta, source_metric)


def sae_acts_name(model, sae=None) -> str:
    """The ``hook_sae_acts_post`` hook of a spliced SAE (``sae``: the SAE or its hook name; default the only one)."""
    spliced = getattr(model, "_splices", {})
    if sae is None:
        if len(spliced) != 1:
            raise ValueError(f"hook='sae_acts' needs one SAE spliced in (model.add_sae), or sae=...; spliced: "
                             f"{list(spliced)}")
        key = next(iter(spliced))
    else:
        key = sae if isinstance(sae, str) else next((k for k, s in spliced.items() if s.sae is sae), None)
        if key not in spliced:
            raise ValueError(f"sae={sae if isinstance(sae, str) else type(sae).__name__} is not spliced in "
                             f"(model.add_sae(sae) first); spliced: {list(spliced)}")
    return f"{spliced[key].output_hook}.hook_sae_acts_post"


def check_ran(model, names: Sequence[str], cache: dict) -> None:
    """A clear error for hook names the forward never ran, saying why."""
    missing = [n for n in names if n not in cache]
    if not missing:
        return
    reasons = []
    for n in missing:
        owner = _submodule(model, n)
        if not isinstance(owner, HookPoint):
            reasons.append(f"{n} is not a HookPoint of this model" + (
                f" (a {type(owner).__name__} stands in its place, e.g. an SAE spliced in: patch the spliced "
                "module's own hook points, or remove it)" if owner is not None else ""))
        elif n.startswith("vision_encoder."):
            reasons.append(f"{n}: the vision tower runs only up to the layer the projector reads "
                           f"(vision_feature_layer {model.cfg.feature_layers}); choose earlier vision layers")
        elif n.endswith("hook_resid_mid") and model.cfg.parallel_attn_mlp:
            reasons.append(f"{n}: attention and MLP run in parallel in this model, so there is no resid_mid; "
                           "patch resid_pre, attn_out or mlp_out")
        else:
            reasons.append(f"{n} was not reached by this model's forward pass")
    raise ValueError("never run in this model's forward pass: " + "; ".join(reasons))


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _chunks(cells: list, size: int, on_engine: set) -> list[list]:
    """Cells grouped by (layer, head), at most ``size`` per chunk on the engine (one per full forward)."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault((cell[1], cell[3]), []).append(cell)
    chunks = []
    for (layer, _), group in groups.items():
        step = max(1, size) if layer in on_engine else 1
        chunks += [group[i:i + step] for i in range(0, len(group), step)]
    return chunks
